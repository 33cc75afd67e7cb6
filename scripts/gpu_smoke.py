"""GPU smoke test of the SentenceKV CUDA path (issue #15 item 9); started by ``scripts/gpu_smoke.sh``.

Never run yet: no GPU was available while it was written. It serves the test model (SmolLM2-135M-Instruct, built by
``sentencekv_vllm.fixtures``) with vLLM's default compilation -- torch.compile and CUDA graphs on, no
``--enforce-eager`` -- and prints one table:

* identity: SentenceKV at budget >= context vs stock FlashAttention (same graph mode, and vLLM's default mode);
* needle at budget 512: SentenceKV vs StreamingLLM (and full attention) on the same server;
* host tier: device KV usage while decoding (``full`` vs ``sentencekv`` on one offloading server) and tokens
  identical to the server without offload;
* mini soak: 200 mixed requests on the offloading server: no 5xx, nothing stuck, device and host blocks back to 0;
* decode step time vs stock at 1 and 8 concurrent 7.5k-token requests.

Every server's log is kept in ``--out``; the start-up log of the SentenceKV servers must show the V1 model runner
and the FULL_AND_PIECEWISE -> PIECEWISE downgrade (issue #15 items 1 and 3). Exit code 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from sentencekv_vllm import fixtures  # noqa: E402
from sentencekv_vllm.eval.launch import Server, vllm_server  # noqa: E402
from tests import prompts  # noqa: E402
from tests.server import metric as _metric  # noqa: E402

MODEL_NAME = "smollm2"
COMMON = ("--max-model-len", "8192", "--served-model-name", MODEL_NAME, "--max-num-seqs", "16")
SMALL_POOL = ("--block-size", "16", "--num-gpu-blocks-override", "1024")   # 16k tokens: offload shows in usage
CHECKS = ("identity", "needle", "host", "soak", "speed")
START_TIMEOUT = 1200      # first start compiles the model and captures CUDA graphs


@dataclass
class Row:
    check: str
    result: str
    ok: bool
    detail: str = ""


def metric(text: str, name: str) -> float:
    """A series by its plugin name or in vLLM's ``vllm:`` namespace (both exports exist across versions)."""
    return _metric(text, name) + (0.0 if name.startswith("vllm:") else _metric(text, "vllm:" + name))


def sentencekv(cfg: dict[str, Any]) -> tuple[str, ...]:
    return ("--attention-backend", "sentencekv", "--additional-config", json.dumps({"sentencekv": cfg}))


STOCK_PIECEWISE = ("--compilation-config", json.dumps({"cudagraph_mode": "PIECEWISE"}))


# -- requests ------------------------------------------------------------------------------------------------------

def client_for(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=900)


def complete(client: openai.OpenAI, prompt: str, max_tokens: int, policy: str | None = None) -> str:
    """Greedy completion, one request at a time (same batch shapes on every server)."""
    extra = {"vllm_xargs": {"sentencekv_policy": policy}} if policy else None
    res = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=extra)
    return res.choices[0].text


def run_all(client: openai.OpenAI, prompt_list: list[str], max_tokens: int, policy: str | None = None) -> list[str]:
    return [complete(client, p, max_tokens, policy) for p in prompt_list]


def stream_times(client: openai.OpenAI, prompt: str, max_tokens: int, policy: str | None = None,
                 on_chunk: Callable[[int], None] | None = None) -> list[float]:
    """Arrival time of every streamed chunk (EOS ignored, so every request decodes ``max_tokens``)."""
    body: dict[str, Any] = {"ignore_eos": True}
    if policy:
        body["vllm_xargs"] = {"sentencekv_policy": policy}
    times = []
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body=body)
    for n, _ in enumerate(stream):
        times.append(time.perf_counter())
        if on_chunk:
            on_chunk(n)
    return times


def decode_step_ms(client: openai.OpenAI, prompt_list: list[str], max_tokens: int = 128) -> float:
    """Median inter-token time of concurrent streams, counted only once every request has its first token
    (so chunked prefills of the others are not in the figure)."""
    with ThreadPoolExecutor(len(prompt_list)) as pool:
        streams = list(pool.map(lambda p: stream_times(client, p, max_tokens), prompt_list))
    start = max(s[0] for s in streams)
    gaps = [b - a for s in streams for a, b in zip(s, s[1:], strict=False) if a >= start]
    return 1000 * statistics.median(gaps)


# -- server logs ---------------------------------------------------------------------------------------------------

def keep_log(srv: Server, out: Path, name: str) -> str:
    text = srv.log_text()
    (out / f"server-{name}.log").write_text(text)
    return text


def startup_facts(log: str) -> tuple[bool, str]:
    """Issue #15 items 1 and 3, as the SentenceKV server logged them."""
    v1 = "V1 model runner" in log and "Using V2 Model Runner" not in log
    piecewise = "FULL_AND_PIECEWISE -> PIECEWISE" in log
    return v1 and piecewise, f"V1 runner logged: {v1}; FULL_AND_PIECEWISE -> PIECEWISE logged: {piecewise}"


# -- checks --------------------------------------------------------------------------------------------------------

def check_identity(model: str, tokenizer: Any, out: Path) -> list[Row]:
    """Budget >= context: every row takes the stock kernel, so tokens must match stock in the same graph mode."""
    cases = prompts.varied_prompts(tokenizer)
    outputs: dict[str, list[str]] = {}
    logs: dict[str, str] = {}
    for name, args in (("stock-default", ()), ("stock-piecewise", STOCK_PIECEWISE),
                       ("sentencekv-8192", sentencekv({"budget": 8192}))):
        with vllm_server(model, *COMMON, *args, timeout=START_TIMEOUT) as srv:
            outputs[name] = run_all(client_for(srv), cases, 64)
            dense = metric(srv.metrics(), "sentencekv_dense_decode_rows_total")
            logs[name] = keep_log(srv, out, name)
    same = sum(a == b for a, b in zip(outputs["sentencekv-8192"], outputs["stock-piecewise"], strict=True))
    same_default = sum(a == b for a, b in zip(outputs["sentencekv-8192"], outputs["stock-default"], strict=True))
    facts_ok, facts = startup_facts(logs["sentencekv-8192"])
    return [
        Row("identity, budget >= context", f"{same}/{len(cases)} identical to stock (PIECEWISE)", same == len(cases),
            f"{same_default}/{len(cases)} identical to stock in vLLM's default FULL_AND_PIECEWISE; "
            f"dense decode rows through SentenceKV's forward: {dense:.0f}"),
        Row("start-up: V1 runner, attention outside CUDA graphs", "logged" if facts_ok else "missing", facts_ok,
            facts),
    ]


def needle_cases(tokenizer: Any) -> list[str]:
    return [prompts.needle_prompt(tokenizer, n, depth, seed=i)
            for i, (n, depth) in enumerate((n, d) for n in (4000, 6000, 7500) for d in (0.2, 0.5, 0.8))]


def check_needle_and_speed(model: str, tokenizer: Any, out: Path, checks: set[str]) -> tuple[list[Row], dict]:
    """Budget 512 server: needle per policy, reference tokens for the host tier, decode step times."""
    rows: list[Row] = []
    ref: dict[str, Any] = {}
    cases = needle_cases(tokenizer)
    with vllm_server(model, *COMMON, *sentencekv({"budget": 512}), timeout=START_TIMEOUT) as srv:
        client = client_for(srv)
        if "needle" in checks or "host" in checks:
            ref["sentencekv"] = run_all(client, cases, 24)
        if "needle" in checks:
            found = {"sentencekv": sum("7291" in t for t in ref["sentencekv"])}
            for policy in ("streaming", "full"):
                found[policy] = sum("7291" in t for t in run_all(client, cases, 24, policy))
            sparse = metric(srv.metrics(), "sentencekv_sparse_decode_rows_total")
            rows.append(Row("needle, budget 512 (9 prompts, 4k-7.5k)",
                            f"sentencekv {found['sentencekv']}/9, streaming {found['streaming']}/9, "
                            f"full {found['full']}/9",
                            found["sentencekv"] > found["streaming"] and found["sentencekv"] >= found["full"] - 1,
                            f"sparse decode rows: {sparse:.0f} (> 0: the sparse path ran under CUDA graphs)"))
        if "speed" in checks:
            ref["speed"] = {b: decode_step_ms(client, long_prompts(tokenizer, b)) for b in (1, 8)}
        keep_log(srv, out, "sentencekv-512")
    return rows, ref


def long_prompts(tokenizer: Any, n: int) -> list[str]:
    return [prompts.long_prompt(tokenizer, 7500, 50_000 + 120_000 * i) for i in range(n)]


def check_speed(model: str, tokenizer: Any, out: Path, sentencekv_ms: dict[int, float]) -> list[Row]:
    with vllm_server(model, *COMMON, timeout=START_TIMEOUT) as srv:
        stock = {b: decode_step_ms(client_for(srv), long_prompts(tokenizer, b)) for b in (1, 8)}
        keep_log(srv, out, "stock-speed")
    return [Row(f"decode step, {b} x 7.5k tokens", f"sentencekv {sentencekv_ms[b]:.1f} ms vs stock {stock[b]:.1f} ms",
                True, f"ratio {sentencekv_ms[b] / stock[b]:.2f} (reported, not gated)") for b in (1, 8)]


def usage_while_decoding(srv: Server, client: openai.OpenAI, prompt: str, policy: str) -> float:
    """Device KV usage sampled half-way through a 200-token decode of one request."""
    seen: list[float] = []

    def sample(n: int) -> None:
        if n == 100:
            seen.append(metric(srv.metrics(), "vllm:kv_cache_usage_perc"))

    stream_times(client, prompt, 200, policy, on_chunk=sample)
    return seen[0]


def check_host_tier(model: str, tokenizer: Any, out: Path, checks: set[str], ref: dict) -> list[Row]:
    rows: list[Row] = []
    cfg = {"budget": 512, "offload": "host", "host_pool_gib": 4.0}
    with vllm_server(model, *COMMON, *SMALL_POOL, *sentencekv(cfg), timeout=START_TIMEOUT) as srv:
        client = client_for(srv)
        if "host" in checks:
            long = long_prompts(tokenizer, 1)[0]
            full = usage_while_decoding(srv, client, long, "full")
            sparse = usage_while_decoding(srv, client, long, "sentencekv")
            tokens = run_all(client, needle_cases(tokenizer), 24)
            same = sum(a == b for a, b in zip(tokens, ref["sentencekv"], strict=True))
            spilled = metric(srv.metrics(), "sentencekv_spilled_blocks_total")
            rows.append(Row("host tier: device KV usage while decoding 7.5k", f"full {100 * full:.1f}% -> "
                            f"sentencekv {100 * sparse:.1f}%", spilled > 0 and sparse < full / 2,
                            f"blocks spilled to host: {spilled:.0f}; pool 1024 x 16 tokens"))
            rows.append(Row("host tier: tokens vs no offload", f"{same}/{len(tokens)} identical",
                            same == len(tokens)))
        if "soak" in checks:
            rows.append(soak(srv, client, tokenizer))
        keep_log(srv, out, "sentencekv-512-host")
    return rows


def one_request(client: openai.OpenAI, i: int, prompt: str, kind: str) -> str:
    """One soak request: streamed, plain (sampled), or aborted by the client mid-stream or by a timeout."""
    if kind == "stream":
        for _ in client.completions.create(model="smollm2", prompt=prompt, max_tokens=48, stream=True):
            pass
        return "ok"
    if kind == "abort-stream":
        stream = client.completions.create(model="smollm2", prompt=prompt, max_tokens=200, stream=True)
        for n, _ in enumerate(stream):
            if n == 2:
                stream.close()
                break
        return "aborted"
    if kind == "abort-timeout":
        try:
            client.with_options(timeout=0.5).completions.create(model="smollm2", prompt=prompt, max_tokens=200)
        except (openai.APITimeoutError, httpx.TimeoutException):
            return "aborted"
        return "ok"
    client.completions.create(model="smollm2", prompt=prompt, max_tokens=48, temperature=0.7)
    return "ok"


def soak(srv: Server, client: openai.OpenAI, tokenizer: Any, n: int = 200) -> Row:
    """A soak of mixed requests (as the CPU fuzz in tests/e2e/hostile/ does), with longer prompts."""
    import random

    rng = random.Random(0)
    shorts = [prompts.chat(tokenizer, q) for q in prompts.SHORT_QUESTIONS]
    longs = [prompts.long_prompt(tokenizer, rng.choice([1500, 3200, 5000, 7000]), rng.randrange(900_000))
             for _ in range(16)]
    jobs = [(i, rng.choice(longs) if rng.random() < 0.3 else rng.choice(shorts),
             rng.choices(["plain", "stream", "abort-stream", "abort-timeout"], [0.4, 0.4, 0.1, 0.1])[0])
            for i in range(n)]
    errors: list[str] = []
    lock = threading.Lock()

    def run(job: tuple[int, str, str]) -> str:
        try:
            return one_request(client, *job)
        except openai.APIStatusError as err:
            with lock:
                errors.append(f"{job[2]}: HTTP {err.status_code}")
            return "error"

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(run, jobs))
    wall = time.time() - t0
    idle = wait_idle(srv)
    after = {k: metric(idle, k) for k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                          "vllm:kv_cache_usage_perc", "sentencekv_host_blocks")}
    ok = not errors and all(v == 0 for v in after.values())
    detail = "after: " + ", ".join(f"{k}={v:g}" for k, v in after.items()) + (f"; {errors[:3]}" if errors else "")
    return Row(f"mini soak, {n} requests (16 at a time)",
               f"{outcomes.count('ok')} ok, {outcomes.count('aborted')} aborted, {len(errors)} errors, {wall:.0f} s",
               ok, detail)


def wait_idle(srv: Server, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    text = srv.metrics()
    while time.time() < deadline:
        if metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:num_requests_waiting") == 0:
            break
        time.sleep(1)
        text = srv.metrics()
    time.sleep(2)
    return srv.metrics()


# -- report --------------------------------------------------------------------------------------------------------

def environment() -> dict[str, str]:
    import torch
    import vllm

    gpu = ""
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip()
    return {"gpu": gpu, "vllm": vllm.__version__, "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "python": platform.python_version(), "model": "SmolLM2-135M-Instruct (bf16)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(rows: list[Row]) -> str:
    lines = ["| check | result | pass | detail |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.result} | {'yes' if r.ok else '**NO**'} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    args = parser.parse_args(argv)
    checks = set(args.checks.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    model = str(fixtures.model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows: list[Row] = []
    if "identity" in checks:
        rows += check_identity(model, tokenizer, args.out)
    ref: dict[str, Any] = {}
    if checks & {"needle", "host", "speed"}:
        needle_rows, ref = check_needle_and_speed(model, tokenizer, args.out, checks)
        rows += needle_rows
    if checks & {"host", "soak"}:
        rows += check_host_tier(model, tokenizer, args.out, checks, ref)
    if "speed" in checks:
        rows += check_speed(model, tokenizer, args.out, ref["speed"])
    env = environment()
    report = "# GPU smoke test\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n" + table(rows) + "\n"
    print(report)
    (args.out / "smoke.md").write_text(report)
    (args.out / "smoke.json").write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]},
                                                    indent=2))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
