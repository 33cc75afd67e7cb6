"""``sentencekv-eval perf``: pure-decode step time of stock vLLM vs SentenceKV, in the same run.

For every (batch, prompt length) point, ``batch`` streaming requests with distinct prompts start together; the
pure-decode window runs from the moment the last of them got its first token to the moment the first of them got
its last token (no prefill in the window). Step time = window / decode steps in it. TTFT is the median over the
point's requests; "TTFT repeated prompt" sends the point's first prompt once more (a prefix-cache hit where the
server caches prefixes; SentenceKV recomputes the observation window).
Servers run one after another with identical arguments (block size, dtype, pool) except the backend. With
``--rounds N`` the variants take turns N times (stock, sentencekv, stock, sentencekv, ...: a fresh server each
turn), so a machine whose speed drifts during the run moves both sides alike; the table gives the median step per
variant and the range of the per-round ratios to stock.

    sentencekv-eval perf --out docs/eval/perf                     # 1x2k, 1x4k, 1x7.5k, 8x7.5k; tau = 1024
    sentencekv-eval perf --points 1x7500,8x7500 --variants stock,sentencekv,exact,host,host-prefault
    sentencekv-eval perf --points 8x4000 --max-tokens 96 --vllm-bench    # + vLLM's own load generator
    sentencekv-eval perf --points 8x7500 --max-tokens 256 --pool-requests 2 --variants stock,host   # batch job

With ``--pool-requests K`` every server gets a device pool that holds K stock requests of the longest point
(``--num-gpu-blocks-override``): a batch job in a fixed pool, where SentenceKV with the host tier can run more
requests at once than stock. Its table reports what such a job costs: wall time, output tokens/s, aggregate decode
tokens/s (decode tokens over the time during which any request was decoding), steady decode tokens/s (once every
request has started: stock's last batch vs all of them with the host tier) and the peak of running requests.

With ``--vllm-bench`` every point also runs ``vllm bench serve`` (random dataset, the point's prompt length and
batch, every request at once) against the same server: its output throughput includes prefill, as a user measures.

Both whole-run tables also give the time of the last request's first token: with every request sent at once it
ends the prefill phase, which SentenceKV runs exactly like stock. "ceiling" (bench) and "floor" (batch job) compare
it with stock's whole run: the best ratio the variant could reach if every decode step after it cost nothing.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from sentencekv_vllm.eval.launch import vllm_server
from sentencekv_vllm.eval.serving import vllm_bench_serve

VARIANTS: dict[str, dict[str, Any] | None] = {
    "stock": None,                                       # vLLM's own CPU backend
    "sentencekv": {},                                    # defaults (attention: auto -> paged; dense under 2 tau)
    "forced": {"dense_below": 1.0},                      # sparse as soon as the context exceeds tau
    "dense": {"dense_below": 64.0},                      # SentenceKV's bookkeeping, every row on the stock kernel
    "exact": {"attention": "exact"},                     # token-exact gather + softmax (the reference path)
    "host": {"offload": "host", "host_pool_gib": 4.0},   # two-tier memory
    "host-prefault": {"offload": "host", "host_pool_gib": 4.0, "host_prefault": True},   # pages touched at start-up
}


def server_args(variant: str, budget: int, block_size: int, max_model_len: int, extra: list[str],
                pool_blocks: int = 0) -> list[str]:
    args = ["--dtype", "bfloat16", "--block-size", str(block_size), "--max-model-len", str(max_model_len),
            "--max-num-seqs", "16", "--served-model-name", "model", "--enforce-eager", *extra]
    if pool_blocks:
        args += ["--num-gpu-blocks-override", str(pool_blocks)]
    cfg = VARIANTS[variant]
    if cfg is not None:
        args += ["--attention-backend", "sentencekv",
                 "--additional-config", json.dumps({"sentencekv": {"budget": budget, **cfg}})]
    return args


def stream_tokens(client: openai.OpenAI, prompt: str, max_tokens: int, start: threading.Barrier) -> dict[str, Any]:
    """One streaming request; chunk arrival times (perf_counter)."""
    start.wait()
    t0 = time.perf_counter()
    times: list[float] = []
    stream = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices:
            times.append(time.perf_counter())
    return {"t0": t0, "times": times}


def decode_point(client: openai.OpenAI, prompts: list[str], max_tokens: int, sampler: Any = None) -> dict[str, Any]:
    """Step time over the pure-decode window of ``len(prompts)`` concurrent requests (None when there is no such
    window: in a small pool some requests finish before others start), and the whole job's throughput.
    ``sampler``: a ``serving.Sampler`` polling the server's /metrics (peak running requests)."""
    barrier = threading.Barrier(len(prompts))
    with ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(lambda p: stream_tokens(client, p, max_tokens, barrier), prompts))
    lo = max(r["times"][0] for r in runs)
    hi = min(r["times"][-1] for r in runs)
    steps = [sum(1 for t in r["times"] if lo < t <= hi) for r in runs]
    gaps = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:], strict=False) if lo <= a and b <= hi]
    n = statistics.median(steps)
    start = min(r["t0"] for r in runs)
    wall = max(r["times"][-1] for r in runs) - start
    decode_tokens = sum(len(r["times"]) - 1 for r in runs)
    return {
        "step_ms": 1e3 * (hi - lo) / n if n and hi > lo else None,
        "median_gap_ms": 1e3 * statistics.median(gaps) if gaps else None,
        "window_steps": n,
        "ttft_s": statistics.median(r["times"][0] - r["t0"] for r in runs),
        "wall_s": wall,
        "output_tok_s": sum(len(r["times"]) for r in runs) / wall,
        "decode_tok_s": decode_tokens / _union([(r["times"][0], r["times"][-1]) for r in runs]),
        "mean_tpot_ms": 1e3 * statistics.mean((r["times"][-1] - r["times"][0]) / max(1, len(r["times"]) - 1)
                                              for r in runs),
        "steady_tok_s": steady_rate([r["times"] for r in runs]),
        "peak_running": sampler.peak_running if sampler is not None else None,
        "chunk_times_s": [[round(t - start, 4) for t in r["times"]] for r in runs],
    }


def steady_rate(times: list[list[float]]) -> float | None:
    """Aggregate decode tokens/s once every request has started: from the last first token to the first last
    token among the requests still running then (stock in a small pool: its last batch; with the host tier: all)."""
    lo = max(t[0] for t in times)
    alive = [t for t in times if t[-1] > lo]
    if not alive:
        return None
    hi = min(t[-1] for t in alive)
    tokens = sum(1 for t in alive for x in t if lo < x <= hi)
    return tokens / (hi - lo) if hi > lo else None


def _union(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of intervals (the time during which any request was decoding)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def repeat_ttft(client: openai.OpenAI, prompt: str) -> float:
    """TTFT of a prompt the server has just served (prefix caching: SentenceKV recomputes the observation window)."""
    run = stream_tokens(client, prompt, 2, threading.Barrier(1))
    return run["times"][0] - run["t0"]


def vllm_bench(url: str, tokenizer_path: str, batch: int, length: int, max_tokens: int) -> dict[str, Any]:
    """``vllm bench serve`` at one point: ``batch`` random prompts of ``length`` tokens sent at once, ``max_tokens``
    each (``--ignore-eos``); returns its saved result's throughput and latency percentiles."""
    res = vllm_bench_serve(url, "model", tokenizer_path, [
        "--dataset-name", "random", "--random-input-len", str(length), "--random-output-len", str(max_tokens),
        "--num-prompts", str(batch), "--request-rate", "inf", "--seed", "0"])
    keys = ("duration", "completed", "output_throughput", "total_token_throughput")
    out = {k: res.get(k) for k in keys}
    out.update({k: v for k, v in res.items() if k.startswith(("median_", "p50_", "p90_", "p99_", "mean_"))})
    if res.get("ttfts"):    # every request is sent at once: the last first token ends the prefill phase
        out["last_ttft_s"] = max(res["ttfts"])
    return out


def prompts_for(tokenizer: Any, batch: int, length: int, salt: int) -> list[str]:
    """``batch`` distinct prompts of ``length`` tokens from the packaged haystack (chat template applied). Points of
    different sizes draw from the same offsets, so the content starts with the point: a later point's prompt
    must not hit the prefix cache with an earlier one's (that made TTFT and wall time of stock and SentenceKV, whose
    prefix caching is on, look better than the host tier's, where it is off)."""
    from sentencekv_vllm import fixtures

    out = []
    for i in range(batch):
        text = fixtures.haystack_text(offset=10_000 + 97_000 * i + 13 * salt, n_chars=length * 6)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        content = f"Passage ({batch} x {length}):\n\n" + tokenizer.decode(ids) + "\n\nContinue the text above."
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True))
    return out


def measure(model: str, tokenizer: Any, points: list[tuple[int, int]], variants: list[str], budget: int,
            block_size: int, max_tokens: int, repeats: int, extra: list[str],
            bench: bool = False, rounds: int = 1, pool_requests: int = 0) -> dict[str, Any]:
    """Every variant's server in turn, ``rounds`` times over; each point ``repeats`` times per server (the
    median run over every round is kept; all runs and each round's median are recorded)."""
    from sentencekv_vllm.eval.engines import Engine
    from sentencekv_vllm.eval.serving import Sampler, scrape, tier_stats

    max_len = max(n for _, n in points) + max_tokens + 256
    max_len = -(-max_len // block_size) * block_size
    pool = pool_blocks(pool_requests, max(n for _, n in points) + max_tokens, max_len, block_size)
    runs: dict[str, dict[str, list[list[dict]]]] = {v: {f"{b}x{n}": [] for b, n in points} for v in variants}
    extras: dict[str, dict[str, dict]] = {v: {f"{b}x{n}": {} for b, n in points} for v in variants}
    for rnd in range(rounds):
        for variant in variants:
            args = server_args(variant, budget, block_size, max_len, extra, pool)
            with vllm_server(model, *args, timeout=600) as srv:
                client = openai.OpenAI(base_url=srv.v1, api_key="none", timeout=1800, max_retries=0)
                client.completions.create(model="model", prompt="Hello", max_tokens=4)       # warm-up
                for batch, length in points:
                    key = f"{batch}x{length}"
                    done = []
                    for rep in range(repeats):
                        engine = Engine(srv, variant)
                        before = scrape(engine)
                        with Sampler(engine, period=0.5) as sampler:
                            done.append(decode_point(client, prompts_for(tokenizer, batch, length, rep), max_tokens,
                                                     sampler))
                        done[-1].update(tier_stats(before, scrape(engine)))
                    runs[variant][key].append(done)
                    mid = _median_run(done)
                    print(f"{variant:>10} {key} round {rnd + 1}/{rounds}: step {mid['step_ms'] or float('nan'):.1f} "
                          f"ms ttft {mid['ttft_s']:.2f} s wall {mid['wall_s']:.1f} s decode "
                          f"{mid['decode_tok_s']:.1f} tok/s peak running {mid['peak_running']}", flush=True)
                    if rnd == 0:
                        extras[variant][key]["ttft_repeat_s"] = repeat_ttft(client, prompts_for(tokenizer, batch,
                                                                                                length, 0)[0])
                    if bench and rnd == 0:
                        extras[variant][key]["vllm_bench"] = vb = vllm_bench(srv.url, model, batch, length, max_tokens)
                        print(f"{variant:>10} {key}: vllm bench serve {vb['output_throughput']:.2f} tok/s, "
                              f"median TPOT {vb.get('median_tpot_ms', float('nan')):.1f} ms", flush=True)
    results: dict[str, Any] = {}
    for variant in variants:
        rows = {}
        for key, per_round in runs[variant].items():
            every = [r for done in per_round for r in done]
            rows[key] = {**_median_run(every), "runs": every, **extras[variant][key],
                         "round_step_ms": [_median_run(done)["step_ms"] for done in per_round]}
            warm = [r["ttft_s"] for done in per_round for r in done[1:]]
            if warm:    # a server's first request at a point pays its first long prefill (allocations, kernels)
                rows[key]["ttft_warm_s"] = statistics.median(warm)
        results[variant] = {"server_args": server_args(variant, budget, block_size, max_len, extra, pool),
                            "points": rows}
    return results


def pool_blocks(requests: int, tokens: int, max_len: int, block_size: int) -> int:
    """Device blocks for ``requests`` stock requests of ``tokens`` tokens (0: vLLM sizes the pool); never below one
    ``max_len`` request (+ 1 block: vLLM's start-up check compares rounded byte counts)."""
    if not requests:
        return 0
    per_request = -(-(tokens + 64) // block_size)    # + the chat template's tokens
    return max(requests * per_request, -(-max_len // block_size) + 1)


def _median_run(runs: list[dict]) -> dict:
    """The median run by step time, or by wall time where there is no pure-decode window (batch jobs)."""
    return sorted(runs, key=lambda x: x["step_ms"] or x["wall_s"])[len(runs) // 2]


def round_ratios(results: dict[str, Any], variant: str, key: str) -> list[float]:
    """Step time over stock's, round by round (each round's two servers ran back to back)."""
    ours = results[variant]["points"][key].get("round_step_ms") or []
    stock = results["stock"]["points"][key].get("round_step_ms") or []
    return [a / b for a, b in zip(ours, stock, strict=False) if a and b]


def table(results: dict[str, Any], points: list[tuple[int, int]]) -> str:
    variants = list(results)
    if any(results[v]["points"][f"{b}x{n}"]["step_ms"] is None for v in variants for b, n in points):
        return job_table(results, points)
    head = "| requests × prompt | " + " | ".join(f"{v} step (ms)" for v in variants) + " |"
    if "stock" in variants:
        head += " " + " | ".join(f"{v} / stock" for v in variants if v != "stock") + " | TTFT stock / skv (s) |"
        head += " TTFT repeated prompt stock / skv (s) |"
        if any("ttft_warm_s" in results[v]["points"][f"{b}x{n}"] for v in variants for b, n in points):
            head = head.replace("TTFT stock / skv (s)", "TTFT stock / skv (s), median of repeats after the first")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for batch, length in points:
        key = f"{batch}x{length}"
        steps = {v: results[v]["points"][key]["step_ms"] for v in variants}
        row = f"| {batch} × {length} | " + " | ".join(f"{steps[v]:.1f}" for v in variants)
        if "stock" in steps:
            row += " | " + " | ".join(f"{steps[v] / steps['stock']:.2f}x{_spread(results, v, key)}"
                                      for v in variants if v != "stock")
            skv = next((v for v in variants if v != "stock"), None)
            ttft = [results[v]["points"][key].get("ttft_warm_s", results[v]["points"][key]["ttft_s"])
                    for v in ("stock", skv or "stock")]
            row += f" | {ttft[0]:.2f} / {ttft[1]:.2f} |" if skv else " | |"
            warm = [results[v]["points"][key].get("ttft_repeat_s") for v in ("stock", skv)]
            row += f" {warm[0]:.2f} / {warm[1]:.2f} |" if skv and None not in warm else " |"
        else:
            row += " |"
        lines.append(row)
    return "\n".join(lines) + "\n" + tier_table(results, points) + bench_table(results, points)


def _spread(results: dict[str, Any], variant: str, key: str) -> str:
    """`` (0.52–0.58 over 3 rounds)`` when there were several rounds."""
    ratios = round_ratios(results, variant, key)
    return f" ({min(ratios):.2f}–{max(ratios):.2f} over {len(ratios)} rounds)" if len(ratios) > 1 else ""


def job_table(results: dict[str, Any], points: list[tuple[int, int]]) -> str:
    """The whole job per point and variant: what a batch job in a fixed pool costs (``--pool-requests``)."""
    lines = ["| requests × prompt | variant | wall s | wall vs stock | output tok/s | decode tok/s | decode vs stock |"
             " steady decode tok/s | steady vs stock | mean TPOT ms | peak running | median TTFT s | last TTFT s |"
             " floor vs stock |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch, length in points:
        key = f"{batch}x{length}"
        stock = results.get("stock", {}).get("points", {}).get(key)
        for variant, res in results.items():
            r = res["points"][key]
            wall = f"{r['wall_s'] / stock['wall_s']:.2f}x" if stock else ""
            dec = f"{r['decode_tok_s'] / stock['decode_tok_s']:.2f}x" if stock else ""
            steady = r.get("steady_tok_s")
            ratio = f"{steady / stock['steady_tok_s']:.2f}x" if stock and steady and stock.get("steady_tok_s") else ""
            last = last_ttft(r)
            floor = f"{last / stock['wall_s']:.2f}x" if stock else ""
            lines.append(f"| {batch} × {length} | {variant} | {r['wall_s']:.1f} | {wall} | {r['output_tok_s']:.2f} | "
                         f"{r['decode_tok_s']:.2f} | {dec} | {steady or float('nan'):.2f} | {ratio} | "
                         f"{r['mean_tpot_ms']:.1f} | {r['peak_running']:g} | {r['ttft_s']:.2f} | "
                         f"{last:.1f} | {floor} |")
    return "\n".join(lines) + "\n" + ("\nlast TTFT: when the last request got its first token (prefills are serial "
                                     "on one engine); floor: that time over stock's wall time, the wall-time ratio "
                                     "the variant would reach if every decode step after it cost nothing.\n")


def last_ttft(run: dict) -> float:
    """Seconds from the first request's start to the last request's first token: no job ends before it."""
    return max(times[0] for times in run["chunk_times_s"])


def tier_table(results: dict[str, Any], points: list[tuple[int, int]]) -> str:
    """The host tier's hot-set figures per point (variants with the tier only; empty otherwise)."""
    rows = [(f"{b} × {n}", v, results[v]["points"][f"{b}x{n}"]) for b, n in points for v in results]
    rows = [r for r in rows if r[2].get("hot_hit_rate") is not None]
    if not rows:
        return ""
    lines = ["", "| requests × prompt | variant | hot-set hit rate | host-read token share | swap-in blocks |",
             "|---|---|---|---|---|"]
    lines += [f"| {key} | {v} | {r['hot_hit_rate']:.2f} | {r['host_token_share'] or 0:.3f} | {r['swap_in_blocks']:g} |"
              for key, v, r in rows]
    return "\n".join(lines) + "\n"


def bench_table(results: dict[str, Any], points: list[tuple[int, int]]) -> str:
    """``vllm bench serve`` per point and variant (empty without ``--vllm-bench``)."""
    rows = [(f"{b}x{n}", v, results[v]["points"][f"{b}x{n}"].get("vllm_bench")) for b, n in points for v in results]
    rows = [r for r in rows if r[2]]
    if not rows:
        return ""
    lines = ["", "`vllm bench serve` (random prompts, all at once, prefill included):", "",
             "| requests × prompt | variant | output tok/s | vs stock | median TTFT ms | median TPOT ms | p99 TPOT ms |"
             " duration s | last TTFT s | ceiling vs stock |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, variant, vb in rows:
        stock = results.get("stock", {}).get("points", {}).get(key, {}).get("vllm_bench")
        ratio = f"{vb['output_throughput'] / stock['output_throughput']:.2f}x" if stock else ""
        last = vb.get("last_ttft_s")
        ceiling = f"{stock['duration'] / last:.2f}x" if stock and last else ""
        lines.append(f"| {key.replace('x', ' × ')} | {variant} | {vb['output_throughput']:.2f} | {ratio} | "
                     f"{vb.get('median_ttft_ms', 0):.0f} | {vb.get('median_tpot_ms', 0):.1f} | "
                     f"{vb.get('p99_tpot_ms', 0):.1f} | {vb['duration']:.1f} | {last or float('nan'):.1f} | "
                     f"{ceiling} |")
    note = ("\nlast TTFT: when the last request got its first token (every request was sent at once, so prefill "
            "ends there); ceiling: stock's duration over that time, the output-throughput ratio the variant would "
            "reach if every step after it cost nothing.\n")
    return "\n".join(lines) + "\n" + (note if any(r[2].get("last_ttft_s") for r in rows) else "")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 8), strict=True):
        for variant, res in results.items():
            pts = sorted((int(k.split("x")[1]), v["step_ms"]) for k, v in res["points"].items()
                         if int(k.split("x")[0]) == batch)
            if pts:
                ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o", label=variant)
        ax.set_title(f"decode step time, batch {batch}")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Any, model: str, tokenizer: Any) -> int:
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = measure(model, tokenizer, points, variants, args.budget or 1024, args.block_size, args.max_tokens,
                      args.repeats, args.server_args.split(), bench=args.vllm_bench, rounds=args.rounds,
                      pool_requests=args.pool_requests)
    meta = {"command": " ".join(["sentencekv-eval", "perf", *args.argv]), "budget": args.budget or 1024,
            "rounds": args.rounds, "block_size": args.block_size, "max_tokens": args.max_tokens,
            "pool_requests": args.pool_requests,
            "wall_s": round(time.time() - t0, 1)}
    (out / "perf.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = table(results, points)
    (out / "perf.md").write_text(f"Command: `{meta['command']}`\n\n{md}")
    if not args.pool_requests:      # a batch job has no pure-decode window to plot
        plot(results, out / "step_time.png")
    print(md)
    return 0
