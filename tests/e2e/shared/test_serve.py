"""Issues #4 and #14: the SENTENCEKV backend behind the real ``vllm serve`` (shared server: float32, 32-token
blocks), real SmolLM2, real OpenAI client. Both sparse decode paths run here: ``attention: auto`` takes the paged
path at the server's budget (512 = 16 blocks) and the exact path for per-request budgets under 8 blocks.

Token-identity checks run in float32 (bf16 has near-ties and stock vLLM on CPU is not batch-invariant in bf16).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sentencekv_vllm import fixtures
from sentencekv_vllm.eval.launch import MULTIPROC_ENV
from sentencekv_vllm.eval.serving import samples
from tests import prompts
from tests.e2e.servers import MODEL_NAME, SHARED
from tests.server import metric

pytestmark = pytest.mark.slow
EXACT_BUDGET = 224      # < 8 blocks of 32: `auto` attends exact tokens


def _healthy(shared) -> None:
    assert requests.get(shared.url + "/health", timeout=10).status_code == 200


def _attended_buckets(text: str) -> dict[str, float]:
    """Cumulative bucket counts by ``le`` (summed over vLLM's ``model_name`` / ``engine`` labels)."""
    found: dict[str, float] = {}
    for s in samples(text):
        if s.name == "sentencekv_attended_tokens_bucket":
            found[s.labels["le"]] = found.get(s.labels["le"], 0.0) + s.value
    return found


def test_backend_is_active(shared):
    log = shared.srv.log_text()
    assert "SentenceKV enabled" in log
    assert "Cannot use SENTENCEKV backend" not in log
    assert "SentenceKV: native CPU kernels loaded" in log      # selection and fold run natively on this server


def test_index_is_reserved_at_start_up_inside_vllms_kv_memory(shared):
    """#15.5: the sentence index is allocated once, at start-up, for every token of the KV pool, and its bytes were
    taken off the memory vLLM sized the pool from (the log line), so it never grows on top of a full device."""
    from sentencekv_vllm.config import SentenceKVConfig
    from sentencekv_vllm.integration.memory import index_capacity, unit_bytes

    found = re.search(r"MiB of KV memory reserved for the sentence index \((\d+) units\)", shared.srv.log_text())
    assert found, "no index reservation logged"
    shared.text("The capital of France is", max_tokens=2)       # gauges are read at a step
    text = shared.metrics()
    blocks = next(int(s.labels["num_gpu_blocks"]) for s in samples(text) if s.name == "vllm:cache_config_info")
    cfg = SentenceKVConfig(**SHARED)
    units = index_capacity(cfg, blocks * 32, 16)
    assert units <= int(found.group(1))                         # the pool vLLM built fits the reservation
    per_unit = unit_bytes(cfg, 30, 3, 64)                       # SmolLM2: 30 layers, 3 KV heads, head dim 64
    index_bytes = metric(text, "sentencekv_index_bytes")
    assert units * per_unit <= index_bytes < units * per_unit + 2**20   # + the per-request running sums


def test_completions_chat_and_streaming(shared):
    assert "Paris" in shared.text("The capital of France is", max_tokens=8)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = shared.client.chat.completions.create(model="smollm2", temperature=0, max_tokens=16, messages=messages)
    assert "Paris" in chat.choices[0].message.content
    chunks = list(shared.client.chat.completions.create(model="smollm2", temperature=0, max_tokens=16, stream=True,
                                                        messages=messages))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and streamed == chat.choices[0].message.content


def test_budget_covering_context_matches_stock(shared, varied, stock_outputs, tokenizer):
    lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in varied]
    assert min(lens) < 100 and sum(1 for n in lens if n > 5000) == 1 and sum(1 for n in lens if n > 1900) == 4
    assert [shared.text(p, sentencekv_budget=8192) for p in varied] == stock_outputs


def _within_budget_and_coherent(shared, prompt: str, bucket: str, **xargs) -> None:
    """48 tokens of ``prompt``: sparse steps were recorded, none attended above ``bucket``, the output is text."""
    before = _attended_buckets(shared.metrics())
    text = shared.text(prompt, max_tokens=48, **xargs)
    after = _attended_buckets(shared.metrics())
    steps = after["+Inf"] - before.get("+Inf", 0)
    assert steps >= 40, "sparse decode steps were not recorded"
    assert after[bucket] - before.get(bucket, 0) == steps, "a sparse step attended more tokens than the budget"
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 5 and len(set(words)) >= 3, f"incoherent output: {text!r}"


def test_small_budget_bounds_attended_tokens(shared, tokenizer):
    """Exact path (budget 192 < 8 blocks): every sparse step attends at most the budget."""
    prompt = prompts.long_prompt(tokenizer, 3000, 200_000, task="Who is speaking in the last line above?")
    _within_budget_and_coherent(shared, prompt, "256.0", sentencekv_budget=192)


@pytest.mark.parametrize("budget", [512, EXACT_BUDGET], ids=["paged", "exact"])
def test_concurrent_mixed_lengths_equal_alone(shared, tokenizer, budget):
    """Batch invariance in float32 on both paths: a request's tokens do not depend on what runs beside it."""
    batch = [prompts.chat(tokenizer, q) for q in prompts.SHORT_QUESTIONS[:2]]
    batch += [prompts.long_prompt(tokenizer, n, off) for n, off in ((1500, 20_000), (3000, 120_000), (900, 330_000))]
    before = _attended_buckets(shared.metrics())
    alone = [shared.text(p, sentencekv_budget=budget) for p in batch]
    with ThreadPoolExecutor(len(batch)) as pool:
        together = list(pool.map(lambda p: shared.text(p, sentencekv_budget=budget), batch))
    assert all(together) and together == alone
    after = _attended_buckets(shared.metrics())
    steps = after["+Inf"] - before.get("+Inf", 0)
    bucket = f"{max(budget, 256)}.0"          # histogram buckets: ..., 256, 512, ...
    assert steps > 50 and after[bucket] - before.get(bucket, 0) == steps
    _healthy(shared)


def test_needle_found_by_sentencekv_missed_by_streaming(shared, needle, traced_needle):
    """One 4.5k-token needle prompt, τ = 512: FULL finds it, SentenceKV finds it on both paths (the traced
    request takes the exact one), streaming cannot."""
    assert "7291" in shared.text(needle, max_tokens=16, sentencekv_policy="full")
    assert "7291" in shared.text(needle, max_tokens=16)                                  # paged
    assert "7291" in traced_needle.choices[0].text                                       # exact
    assert "7291" not in shared.text(needle, max_tokens=16, sentencekv_policy="streaming")
    _healthy(shared)


def test_snapkv_baseline_per_request(shared, tokenizer):
    """Issue #16: the SnapKV baseline (``policies/snapkv.py``) chosen per request on the sentence server. It runs
    (on the exact path even at a budget where ``auto`` pages: its choice is per token), every sparse step attends
    at most the budget, the output is text, and the server stays healthy."""
    prompt = prompts.long_prompt(tokenizer, 3000, 260_000, task="Who is speaking in the last line above?")
    _within_budget_and_coherent(shared, prompt, "512.0", sentencekv_policy="snapkv")
    _healthy(shared)


def test_reference_policy_runs_the_authors_step_per_request(shared, needle):
    """Issue #13.9: ``sentencekv_policy: reference`` serves the authors' decode step for step (the worker steps
    ``policies/reference.py``'s own state per request and layer). On the 4.5k needle at τ = 512 it finds the
    needle; normal steps attend at most τ tokens per query head, while the first step attends the whole
    compressed f·τ pool (1024 entries + the new token), which the served policy never does."""
    before = _attended_buckets(shared.metrics())
    res = shared.complete(needle, max_tokens=16, sentencekv_policy="reference")
    assert "7291" in res.choices[0].text
    after = _attended_buckets(shared.metrics())
    steps = {b: after[b] - before.get(b, 0) for b in after}
    # the first token comes from the prefill step; every later one from a decode row on the reference path
    assert steps["+Inf"] == res.usage.completion_tokens - 1 >= 12
    assert steps["512.0"] >= 12, "normal reference steps attend at most the budget"
    assert steps["1536.0"] - steps["1024.0"] >= 1, "the first step attends the whole compressed pool"
    assert steps["1536.0"] == steps["+Inf"]
    _healthy(shared)


def test_prometheus_scrapes_sentencekv_series(shared, tokenizer):
    """Issues #7, #17: a real Prometheus server scrapes vLLM's /metrics; the sentencekv series exist, move and
    carry vLLM's labels, on a server started without ``PROMETHEUS_MULTIPROC_DIR`` (KV-connector stats path)."""
    from tests.prometheus import prometheus_scraping

    environ = Path(f"/proc/{shared.srv.proc.pid}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith(MULTIPROC_ENV.encode() + b"=") for v in environ)
    with prometheus_scraping(shared.url) as prom:
        before = prom.wait_for("sum(sentencekv_sparse_decode_rows_total)", lambda v: v >= 0)
        labelled = f'count(sentencekv_sparse_decode_rows_total{{model_name="{MODEL_NAME}",engine="0"}})'
        assert prom.wait_for(labelled, lambda v: v >= 1) == 1
        assert prom.wait_for("max(sentencekv_budget_tokens)", lambda v: v > 0) == 512
        prom.wait_for("sum(vllm:num_requests_running)", lambda v: v >= 0)
        shared.text(prompts.long_prompt(tokenizer, 2000, 50_000), max_tokens=16)
        after = prom.wait_for("sum(sentencekv_sparse_decode_rows_total)", lambda v: v >= before + 15)
        assert after - before >= 15
        assert prom.wait_for("sum(sentencekv_prompt_sentences_count)", lambda v: v > 0) > 0
    assert metric(shared.metrics(), "sentencekv_sparse_decode_rows_total") >= after
    deadline = time.time() + 30         # worker gauges are re-read in the step that retires the request
    while metric(shared.metrics(), "sentencekv_live_requests") != 0 and time.time() < deadline:
        time.sleep(0.5)
    assert metric(shared.metrics(), "sentencekv_live_requests") == 0, "a worker gauge stayed stale at idle"


def test_dense_below_keeps_short_contexts_on_the_stock_kernel(shared, tokenizer):
    """``dense_below`` (per request here; the server runs 1): an ~800-token prompt at budget 512 decodes densely
    with ``dense_below: 2`` (identical tokens to a budget covering the context, no sparse rows) and sparsely with
    the server's 1."""
    prompt = prompts.long_prompt(tokenizer, 800, 120_000, task="Summarize the text above.")

    def rows() -> tuple[float, float]:
        text = shared.metrics()
        return (metric(text, "sentencekv_sparse_decode_rows_total"), metric(text, "sentencekv_dense_decode_rows_total"))

    sparse0, dense0 = rows()
    dense_text = shared.text(prompt, max_tokens=24, sentencekv_dense_below=2.0)
    sparse1, dense1 = rows()
    assert sparse1 == sparse0 and dense1 - dense0 >= 20, (sparse0, sparse1, dense0, dense1)
    assert dense_text == shared.text(prompt, max_tokens=24, sentencekv_budget=8192)
    shared.text(prompt, max_tokens=24)
    sparse2, _ = rows()
    assert sparse2 - sparse1 >= 20, "the server's dense_below 1 should decode this prompt sparsely"


def _streamed(shared, prompt: str, max_tokens: int = 24) -> tuple[float, str]:
    """(time to first token in s, text) of a streamed greedy completion."""
    t0 = time.perf_counter()
    ttft, parts = None, []
    for chunk in shared.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].text)
    assert ttft is not None
    return ttft, "".join(parts)


def _prefix_hits(shared) -> float:
    return metric(shared.metrics(), "vllm:prefix_cache_hits_total")


def test_prefix_cache_hit_keeps_tokens_and_cuts_ttft(shared, tokenizer):
    """Issue #14: prefix caching stays on. The same long prompt twice: the second request reuses all but the last
    blocks (the observation window is always recomputed, so the index and the output do not change), its TTFT is
    far below the first one's, and it decodes sparsely (budget 512) to the same tokens."""
    prompt = prompts.long_prompt(tokenizer, 3000, 450_000, task="Summarize the text above in one sentence.")
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    hits0 = _prefix_hits(shared)
    cold_ttft, cold = _streamed(shared, prompt)
    hits1 = _prefix_hits(shared)
    warm_ttft, warm = _streamed(shared, prompt)
    hits2 = _prefix_hits(shared)
    assert warm == cold
    assert hits1 - hits0 < 64, "the first request should find nothing cached"
    assert n - 32 - 2 * 32 <= hits2 - hits1 <= n - 32, (n, hits2 - hits1)    # capped before the 32-token window
    assert warm_ttft < 0.5 * cold_ttft, (cold_ttft, warm_ttft)
    _healthy(shared)


def test_multi_turn_chat_reuses_the_previous_turn(shared, tokenizer):
    """A chat's second turn shares the first turn's prompt as a prefix: it hits the cache and answers exactly as
    the same request does with the cache bypassed (``prompt_logprobs`` makes vLLM skip reading it)."""
    doc = tokenizer.decode(tokenizer(fixtures.haystack_text(offset=520_000, n_chars=14_000),
                                     add_special_tokens=False)["input_ids"][:2000])
    turn1 = [{"role": "user", "content": doc + "\n\nWhat is the text above about?"}]
    ask = dict(model=MODEL_NAME, temperature=0, max_tokens=24)
    answer = shared.client.chat.completions.create(messages=turn1, **ask).choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Say it in five words."}]
    hits0 = _prefix_hits(shared)
    cached = shared.client.chat.completions.create(messages=turn2, **ask).choices[0].message.content
    assert _prefix_hits(shared) - hits0 >= 2000 - 64, "the second turn should reuse the first turn's blocks"
    bypass = shared.client.chat.completions.create(messages=turn2, extra_body={"prompt_logprobs": 0}, **ask)
    assert cached == bypass.choices[0].message.content
