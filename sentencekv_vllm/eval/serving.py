"""Serving measurements through the OpenAI server: TTFT / TPOT / inter-token latency (mean and p50 / p90 / p99) and
throughput over a batch x context grid, Poisson load with a latency CDF, device KV blocks per request and max
concurrency in a fixed pool, decode time split. Works against any OpenAI-compatible server; the ``/metrics``
columns are empty when the server exposes none."""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from prometheus_client.parser import text_string_to_metric_families

from sentencekv_vllm.eval.engines import Engine

PERCENTILES = (50, 90, 99)


def samples(text: str) -> Iterable[Any]:
    """Every sample of a Prometheus text exposition, through prometheus_client's own parser."""
    for family in text_string_to_metric_families(text):
        yield from family.samples


def sum_by_name(text: str) -> dict[str, float]:
    """Sum of each series (labels dropped, NaN skipped), keyed by sample name (``..._total`` kept)."""
    out: dict[str, float] = {}
    for s in samples(text):
        if not math.isnan(s.value):
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def scrape(engine: Engine) -> dict[str, float]:
    """Sum of each series on the engine's /metrics (labels dropped)."""
    return sum_by_name(engine.metrics_text())


def server_info(engine: Engine) -> dict[str, Any]:
    """What the server says it runs with: vLLM's cache config (block size, device blocks) and SentenceKV's budget
    gauge, so report headers print the values actually used rather than the harness's defaults."""
    info: dict[str, Any] = {}
    for s in samples(engine.metrics_text()):
        if s.name == "vllm:cache_config_info":
            for key in ("block_size", "num_gpu_blocks"):
                if s.labels.get(key, "").isdigit():
                    info[key] = int(s.labels[key])
        elif s.name == "sentencekv_budget_tokens" and not math.isnan(s.value):
            info["budget"] = max(info.get("budget", 0), int(s.value))
    return info


def num_device_blocks(engine: Engine) -> int:
    return server_info(engine).get("num_gpu_blocks", 0)


class Sampler:
    """Polls /metrics while a load runs: peak running requests and peak KV usage, plus every usage sample with its
    time (``usage_series``) for measurements that must line up with token arrivals."""

    def __init__(self, engine: Engine, period: float = 0.25) -> None:
        self.engine, self.period = engine, period
        self.peak_running = 0.0
        self.peak_usage = 0.0
        self.usage_series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = scrape(self.engine)
            self.peak_running = max(self.peak_running, m.get("vllm:num_requests_running", 0))
            usage = m.get("vllm:kv_cache_usage_perc", 0)
            self.peak_usage = max(self.peak_usage, usage)
            self.usage_series.append((time.perf_counter(), usage))
            time.sleep(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def stream_one(engine: Engine, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed request with a fixed output length: TTFT, TPOT, end-to-end latency and every inter-token gap
    (from the arrival time of each streamed chunk; vLLM streams one token per chunk)."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    extra = dict(engine.xargs() or {})
    extra["ignore_eos"] = True
    stream = engine.client.completions.create(model=engine.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, stream=True, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - t0 if stamps else float("nan")
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tpot = (stamps[-1] - stamps[0]) / len(itl) if itl else float("nan")
    return {"ttft_s": ttft, "tpot_s": tpot, "latency_s": end - t0, "chunks": len(stamps), "itl_s": itl}


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    """``{prefix_p50, prefix_p90, prefix_p99}`` (linear interpolation, as numpy's default); NaN when empty."""
    vals = sorted(v for v in values if v == v)
    out = {}
    for p in PERCENTILES:
        if not vals:
            out[f"{prefix}_p{p}"] = float("nan")
            continue
        k = (len(vals) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        out[f"{prefix}_p{p}"] = vals[lo] + (vals[hi] - vals[lo]) * (k - lo)
    return out


def latency_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and p50 / p90 / p99 of TTFT and TPOT (per request) and inter-token latency (per token gap)."""
    def mean(values: list[float]) -> float:
        vals = [v for v in values if v == v]
        return statistics.mean(vals) if vals else float("nan")

    ttft = [r["ttft_s"] for r in rows]
    tpot = [r["tpot_s"] for r in rows]
    itl = [gap for r in rows for gap in r["itl_s"]]
    return {"ttft_s": mean(ttft), "tpot_s": mean(tpot), "itl_s": mean(itl),
            **percentiles(ttft, "ttft_s"), **percentiles(tpot, "tpot_s"), **percentiles(itl, "itl_s")}


def batch_point(engine: Engine, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    before = scrape(engine)
    with Sampler(engine) as sampler, ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        rows = list(pool.map(lambda p: stream_one(engine, p, max_tokens), prompts))
        wall = time.perf_counter() - t0
    after = scrape(engine)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    decode_s = sum(r["tpot_s"] * max(0, r["chunks"] - 1) for r in rows if r["tpot_s"] == r["tpot_s"])
    return {
        **latency_stats(rows),
        "throughput_tok_s": sum(r["chunks"] for r in rows) / wall,
        "peak_running": sampler.peak_running,
        "peak_kv_usage": sampler.peak_usage,
        "selection_s": delta("sentencekv_selection_seconds_total"),
        "attention_s": delta("sentencekv_sparse_attention_seconds_total"),
        "swap_in_blocks": delta("sentencekv_swap_in_blocks_total"),
        "host_token_share": _ratio(delta("sentencekv_selected_host_tokens_total"),
                                   delta("sentencekv_selected_tokens_total")),
        "hot_hit_rate": _ratio(delta("sentencekv_hot_set_hits_total"),
                               delta("sentencekv_hot_set_hits_total") + delta("sentencekv_hot_set_misses_total")),
        "transfer_s": delta("sentencekv_transfer_seconds_total"),
        "decode_s_sum": decode_s,
        "preemptions": delta("vllm:num_preemptions_total"),
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def poisson_load(engine: Engine, prompts: list[str], rate: float, max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Requests arrive with exponential gaps (mean 1/rate); returns the sorted end-to-end latencies plus TTFT /
    TPOT / ITL percentiles over the run."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def fire(prompt: str) -> None:
        row = stream_one(engine, prompt, max_tokens)
        with lock:
            rows.append(row)

    threads = []
    for prompt in prompts:
        th = threading.Thread(target=fire, args=(prompt,))
        th.start()
        threads.append(th)
        time.sleep(rng.expovariate(rate))
    for th in threads:
        th.join()
    latencies = sorted(r["latency_s"] for r in rows)
    return {"latencies": latencies, **latency_stats(rows), **percentiles(latencies, "latency_s")}


def device_blocks_per_request(engine: Engine, prompt: str, max_tokens: int) -> float:
    """KV blocks one request holds on the device while it decodes alone: the median of vLLM's usage gauge sampled
    (by a poller, so a slow /metrics never holds the stream back) between the third streamed token and the last
    (prefill allocates progressively and SentenceKV spills at the first decode step, so only samples taken after
    tokens have arrived are the steady state). Scraping inside the stream loop measured 0 on a faster machine: the
    server had finished while the client was still reading buffered tokens."""
    total = num_device_blocks(engine)
    stamps: list[float] = []
    with Sampler(engine, period=0.02) as sampler:
        stream = engine.client.completions.create(model=engine.model, prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            stamps.append(time.perf_counter())
    if len(stamps) < 4:
        return float("nan")
    usage = [u for t, u in sampler.usage_series if stamps[2] <= t < stamps[-1]]
    return statistics.median(usage) * total if usage else float("nan")


def latency_cdf_plot(curves: dict[str, list[float]], path: str, title: str = "") -> None:
    """Empirical CDF as a step function (each request is one step, no interpolation between them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, lat in curves.items():
        if lat:
            xs = sorted(lat)
            ax.step([xs[0], *xs], [0.0, *[(i + 1) / len(xs) for i in range(len(xs))]], where="post",
                    label=f"{name} (n={len(xs)})")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("share of requests ≤ x")
    ax.set_ylim(0, 1.02)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def step_time_plot(per_policy: dict[str, Any], path: str, title: str = "") -> bool:
    """Decode step time (TPOT p50, ms) against context length, one line per policy and batch size: how the cost of a
    token grows with the context each policy attends to. False when the grid has a single context (nothing drawn)."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for policy, b in per_policy.items():
        for p in b["grid"]:
            value = p.get("tpot_s_p50", p["tpot_s"])
            if value == value:
                lines.setdefault(f"{policy} batch {p['batch']}", []).append((p["ctx"], value * 1000))
    if not any(len({c for c, _ in pts}) > 1 for pts in lines.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in lines.items():
        pts.sort()
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TPOT p50 (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def memory_plot(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Device blocks per request and max concurrent requests per engine and prompt length (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({r["ctx"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / max(1, len(engines))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for panel, (key, label) in zip(axes, (("blocks_per_request", "device KV blocks per request"),
                                          ("peak_running", "max running requests (fixed pool)")), strict=True):
        for i, engine in enumerate(engines):
            values = [next((r[key] for r in rows if r["ctx"] == c and r["engine"] == engine), 0) for c in ctxs]
            bars = panel.bar([x + i * width for x in range(len(ctxs))], values, width, label=engine)
            panel.bar_label(bars, fmt="%.1f", fontsize=7)
        panel.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(ctxs))], [str(c) for c in ctxs])
        panel.set_xlabel("prompt tokens")
        panel.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
