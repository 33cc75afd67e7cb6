"""Issue #13 items 2, 4 and 6: no option, client or scheduling event may crash the engine (hostile server, see
``conftest.py``). ``/health`` is asserted after every case."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import requests

from sentencekv_vllm import fixtures
from tests import prompts
from tests.e2e.hostile.conftest import MAX_MODEL_LEN
from tests.server import metric

pytestmark = pytest.mark.slow

VIOLATIONS = "sentencekv_slot_invariant_violations_total"


def healthy(server) -> bool:
    try:
        return requests.get(server.url + "/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def wait_until(server, predicate, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = server.metrics()
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError("condition not reached in time")


def wait_idle(server) -> str:
    wait_until(server, lambda t: metric(t, "vllm:num_requests_running") == 0
               and metric(t, "vllm:num_requests_waiting") == 0)
    time.sleep(2)      # the step that hands finished ids to the worker, and the last frees
    return server.metrics()


_HAYSTACK_IDS: list[int] = []


def token_prompt(tokenizer, n: int, offset: int) -> list[int]:
    """``n`` real text tokens (token-id prompts give exact lengths around block boundaries)."""
    if not _HAYSTACK_IDS:
        text = fixtures.haystack_text(n_chars=400_000, offset=50_000)
        _HAYSTACK_IDS.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    offset %= len(_HAYSTACK_IDS) - n
    return _HAYSTACK_IDS[offset:offset + n]


def generate(client, prompt, max_tokens: int, priority: int, xargs: dict | None = None) -> tuple[str, int]:
    body = {"priority": priority, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=body)
    return res.choices[0].finish_reason, res.usage.completion_tokens


# -- item 2 --------------------------------------------------------------------------------------------------

def test_spacy_segmentation_serves_requests_and_segments_generated_text(server, client, tokenizer, trace_dir):
    """Before the fix the first finished prefill raised ``'SpacySegmenter' object has no attribute 'stream'``
    inside the engine."""
    prompt = prompts.long_prompt(tokenizer, 400, 123_000, task="Write ten short sentences about the sea.")
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=64, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert (res.choices[0].finish_reason, res.usage.completion_tokens) == ("length", 64)
    assert healthy(server)
    deadline = time.time() + 30
    docs: list[dict] = []
    while time.time() < deadline and not docs:       # written when the runner drops the finished request
        generate(client, "Hello", 2, priority=0)     # a later step lets the worker retire it
        docs = [json.loads(p.read_text()) for p in trace_dir.glob(f"{res.id}*.json")]
        time.sleep(0.5)
    assert docs, f"no retrieval trace was written for {res.id}: {sorted(p.name for p in trace_dir.iterdir())}"
    doc = docs[0]
    assert len(doc["sentences"]) > 5, "the prompt was not segmented"
    generated = [s for s in doc["sentences"] if s["generated"]]
    assert generated, ("generated text was not segmented (spaCy mode uses the punct stream for it): "
                       f"{res.choices[0].text!r}, records {[r['text'] for r in doc['generated']]}")
    assert all(s["start"] >= doc["prompt_len"] for s in generated)


# -- item 4 --------------------------------------------------------------------------------------------------

def test_new_request_admitted_while_a_preempted_one_waits(server, client, tokenizer):
    """``--max-num-seqs 2``: A (low priority, 860-token prompt, dense: budget above its context) decodes; B (high
    priority, 480 tokens) fills the rest of the 44-block pool; the next block either needs makes vLLM preempt A;
    C (high priority) is admitted while A waits. Before the fix A kept its worker request slot, and admitting C
    raised "more running requests than scheduler_config.max_num_seqs" inside the engine."""
    before = server.metrics()
    a_prompt, b_prompt, c_prompt = (token_prompt(tokenizer, n, off)
                                    for n, off in ((860, 1_000), (480, 40_000), (100, 70_000)))
    chunks, finish, a_tokens = 0, None, 0
    with ThreadPoolExecutor(2) as pool:
        stream = client.completions.create(
            model="smollm2", prompt=a_prompt, max_tokens=100, temperature=0, stream=True,
            stream_options={"include_usage": True},
            extra_body={"priority": 10, "ignore_eos": True, "vllm_xargs": {"sentencekv_budget": 1200}})
        futures = []
        for chunk in stream:
            chunks += 1
            if chunks == 5:          # A is decoding: B takes the second seat, C waits for one
                futures.append(pool.submit(generate, client, b_prompt, 40, 0, {"sentencekv_policy": "full"}))
                time.sleep(0.3)
                futures.append(pool.submit(generate, client, c_prompt, 16, 0))
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                a_tokens = chunk.usage.completion_tokens
        results = [f.result() for f in futures]
    idle = wait_idle(server)
    assert healthy(server)
    assert metric(idle, "vllm:num_preemptions_total") > metric(before, "vllm:num_preemptions_total"), \
        "the pool never forced a preemption"
    assert (finish, a_tokens, results) == ("length", 100, [("length", 40), ("length", 16)])
    assert "growing the request-slot pool" not in server.log_text(), "preempted requests kept their slots"
    assert metric(idle, "vllm:kv_cache_usage_perc") == 0 and metric(idle, "sentencekv_host_blocks") == 0
    assert metric(idle, VIOLATIONS) == 0


# -- item 6 --------------------------------------------------------------------------------------------------

FUZZ_REQUESTS = int(os.environ.get("SENTENCEKV_FUZZ_REQUESTS", "200"))
SINKS_RECENT = 64
VALID_POLICIES = ["sentencekv", "full", "streaming", "snapkv"]


def valid_budget(rng: random.Random, prompt_len: int) -> int:
    """Budgets just above sinks + recent, at block boundaries (32), at the context length and max_model_len."""
    around_prompt = [b for b in (prompt_len - 1, prompt_len, prompt_len + 1) if SINKS_RECENT < b <= MAX_MODEL_LEN]
    return rng.choice([SINKS_RECENT + 1, SINKS_RECENT + 2, 95, 96, 97, 127, 128, 129, 255, 256, 257,
                       MAX_MODEL_LEN - 1, MAX_MODEL_LEN, *around_prompt * 3])


def invalid_xargs(rng: random.Random, xargs: dict):
    """One way to get a 400: budget at/below sinks + recent or above max_model_len, wrong types, a policy the
    server cannot run, a ``sentencekv_`` key that cannot be set per request, or ``vllm_xargs`` not an object."""
    kind = rng.randrange(5)
    if kind == 0:
        xargs["sentencekv_budget"] = rng.choice([SINKS_RECENT - 1, SINKS_RECENT, 0, -32, MAX_MODEL_LEN + 1, 10**12])
    elif kind == 1:
        xargs["sentencekv_budget"] = rng.choice(["256", 256.0, 128.5, True, None, [256]])
    elif kind == 2:
        xargs["sentencekv_policy"] = rng.choice(["quest", "reference", "h2o", "SENTENCEKV", "", 3, None, ["full"]])
    elif kind == 3:
        xargs[rng.choice(["sentencekv_sinks", "sentencekv_offload", "sentencekv_", "sentencekv_bogus"])] = 4
    else:
        return rng.choice(["budget", ["sentencekv_budget", 128], 7])
    return xargs


def fuzz_xargs(rng: random.Random, prompt_len: int):
    """Random ``vllm_xargs``: none, valid overrides of every server-compatible policy (extra non-SentenceKV keys
    are ignored), or -- one request in four -- an invalid one."""
    if rng.random() < 0.1:
        return None
    xargs: dict = {}
    if rng.random() < 0.85:
        xargs["sentencekv_budget"] = valid_budget(rng, prompt_len)
    if rng.random() < 0.6:
        xargs["sentencekv_policy"] = rng.choice(VALID_POLICIES)
    if rng.random() < 0.1:
        xargs[rng.choice(["unrelated_key", "SENTENCEKV_BUDGET", "sentencekvbudget"])] = rng.choice([4, "x", None])
    return invalid_xargs(rng, xargs) if rng.random() < 0.25 else xargs


def fuzz_prompt_len(rng: random.Random) -> int:
    """Block boundaries (32), tiny prompts, typical ones and the context limit (the last two too long: 400)."""
    roll = rng.random()
    if roll < 0.3:
        return rng.choice([1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 255, 256, 257,
                           MAX_MODEL_LEN - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 7])
    return rng.randint(3, 400) if roll < 0.85 else rng.randint(400, 1000)


def fuzz_job(rng: random.Random, tokenizer, i: int) -> dict:
    n = fuzz_prompt_len(rng)
    return {"i": i, "prompt": token_prompt(tokenizer, n, rng.randrange(10**6)), "n": n,
            "max_tokens": rng.choice([1, 2, 4, 8, 16, 24]), "xargs": fuzz_xargs(rng, n),
            "kind": rng.choices(["plain", "stream", "abort-stream", "timeout"], [0.45, 0.35, 0.1, 0.1])[0],
            "priority": rng.randint(-2, 10), "temperature": rng.choice([0.0, 0.0, 0.8]),
            "ignore_eos": rng.random() < 0.5, "close_after": rng.randint(0, 3),
            "timeout": rng.uniform(0.05, 1.5)}


def run_fuzz_job(client, job: dict) -> str:
    """Outcome: ``ok`` (200), ``4xx`` (refused cleanly), ``aborted`` (client gave up) or ``5xx``/``error``."""
    body = {"priority": job["priority"], "ignore_eos": job["ignore_eos"]}
    if job["xargs"] is not None:
        body["vllm_xargs"] = job["xargs"]
    kw = dict(model="smollm2", prompt=job["prompt"], max_tokens=job["max_tokens"],
              temperature=job["temperature"], extra_body=body)
    try:
        if job["kind"] in ("stream", "abort-stream"):
            stream = client.completions.create(stream=True, **kw)
            for n, _ in enumerate(stream):
                if job["kind"] == "abort-stream" and n >= job["close_after"]:
                    stream.close()
                    return "aborted"
            return "ok"
        if job["kind"] == "timeout":
            client.with_options(timeout=job["timeout"]).completions.create(**kw)
            return "ok"
        client.completions.create(**kw)
        return "ok"
    except (openai.APITimeoutError, httpx.TimeoutException):
        return "aborted" if job["kind"] == "timeout" else "error: timeout"
    except openai.APIStatusError as err:
        return "4xx" if 400 <= err.status_code < 500 else f"5xx: {err.status_code} {str(err)[:200]}"
    except openai.APIConnectionError as err:
        return f"error: {err!r}"[:300]


def server_rss(proc) -> int:
    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_fuzz_requests_never_break_the_engine(server, client, tokenizer):
    """Also the soak of issue #8: aborts mid-stream and by client timeout, sampling, every block and host slot
    back afterwards, nothing stuck, server memory stable."""
    rng = random.Random(1313)
    rss_start = server_rss(server.proc)
    jobs = [fuzz_job(rng, tokenizer, i) for i in range(FUZZ_REQUESTS)]
    lock = threading.Lock()
    bad: list[tuple[dict, str]] = []

    def run(job: dict) -> str:
        outcome = run_fuzz_job(client, job)
        if outcome not in ("ok", "4xx", "aborted"):
            with lock:
                bad.append(({k: v for k, v in job.items() if k != "prompt"}, outcome))
        return outcome

    t0 = time.time()
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(run, jobs))
    wall = time.time() - t0
    idle = wait_idle(server)
    figures = {"requests": len(jobs), "wall_s": round(wall, 1),
               **{k: outcomes.count(k) for k in ("ok", "4xx", "aborted")},
               "bad": len(bad), "preemptions": metric(idle, "vllm:num_preemptions_total"),
               "spilled_blocks": metric(idle, "sentencekv_spilled_blocks_total"),
               "host_tier_full": metric(idle, "sentencekv_host_tier_full_total"),
               "slot_violations": metric(idle, VIOLATIONS),
               "kv_usage_after": metric(idle, "vllm:kv_cache_usage_perc"),
               "host_blocks_after": metric(idle, "sentencekv_host_blocks"),
               "rss_start_mb": round(rss_start / 2**20), "rss_end_mb": round(server_rss(server.proc) / 2**20)}
    print(json.dumps(figures, indent=2))
    assert not bad, bad[:5]
    assert healthy(server)
    assert figures["ok"] >= len(jobs) // 3 and figures["4xx"] >= len(jobs) // 10 and figures["aborted"] > 0
    assert figures["spilled_blocks"] > 0, "the host tier was never used"
    assert figures["slot_violations"] == 0, "host-slot invariant violated"
    assert figures["kv_usage_after"] == 0, "device blocks leaked"
    assert figures["host_blocks_after"] == 0, "host blocks leaked"
    assert figures["rss_end_mb"] < figures["rss_start_mb"] * 1.25 + 300, "server RSS grew"
    assert generate(client, token_prompt(tokenizer, 400, 5), 8, 0) == ("length", 8)
    assert healthy(server)
