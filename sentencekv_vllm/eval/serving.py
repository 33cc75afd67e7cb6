"""Serving measurements through the OpenAI server: TTFT / TPOT / throughput over a batch x context grid, Poisson
load with a latency CDF, device KV blocks per request and max concurrency in a fixed pool, decode time split."""

from __future__ import annotations

import random
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from sentencekv_vllm.eval.engines import Engine


def scrape(engine: Engine) -> dict[str, float]:
    """Sum of each series on /metrics (labels dropped)."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$",
                         requests.get(engine.server.url + "/metrics", timeout=30).text, re.M):
        if m.group(3) != "NaN":
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def num_device_blocks(engine: Engine) -> int:
    text = requests.get(engine.server.url + "/metrics", timeout=30).text
    m = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text)
    return int(m.group(1)) if m else 0


class Sampler:
    """Polls /metrics while a load runs: peak running requests and peak KV usage."""

    def __init__(self, engine: Engine, period: float = 0.25) -> None:
        self.engine, self.period = engine, period
        self.peak_running = 0.0
        self.peak_usage = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = scrape(self.engine)
            self.peak_running = max(self.peak_running, m.get("vllm:num_requests_running", 0))
            usage = m.get("vllm:kv_cache_usage_perc", 0)
            self.peak_usage = max(self.peak_usage, usage)
            time.sleep(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def stream_one(engine: Engine, prompt: str, max_tokens: int) -> dict[str, float]:
    """One streamed request with a fixed output length: TTFT, TPOT and end-to-end latency."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    extra = dict(engine.xargs() or {})
    extra["ignore_eos"] = True
    stream = engine.client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              stream=True, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - t0 if stamps else float("nan")
    tpot = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"ttft_s": ttft, "tpot_s": tpot, "latency_s": end - t0, "chunks": len(stamps)}


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
        "ttft_s": statistics.mean(r["ttft_s"] for r in rows),
        "tpot_s": statistics.mean(r["tpot_s"] for r in rows),
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


def poisson_load(engine: Engine, prompts: list[str], rate: float, max_tokens: int, seed: int = 0) -> list[float]:
    """Requests arrive with exponential gaps (mean 1/rate); returns end-to-end latencies."""
    rng = random.Random(seed)
    latencies: list[float] = []
    lock = threading.Lock()

    def fire(prompt: str) -> None:
        lat = stream_one(engine, prompt, max_tokens)["latency_s"]
        with lock:
            latencies.append(lat)

    threads = []
    for prompt in prompts:
        th = threading.Thread(target=fire, args=(prompt,))
        th.start()
        threads.append(th)
        time.sleep(rng.expovariate(rate))
    for th in threads:
        th.join()
    return sorted(latencies)


def device_blocks_per_request(engine: Engine, prompt: str, max_tokens: int) -> float:
    """KV blocks one request holds on the device while it decodes alone: vLLM's usage gauge read after each
    streamed token from the third on (prefill allocates progressively and SentenceKV spills at the first decode
    step, so only samples taken after tokens have arrived are the steady state)."""
    total = num_device_blocks(engine)
    samples: list[float] = []
    stream = engine.client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    for n, _ in enumerate(stream):
        if n >= 2:
            samples.append(scrape(engine).get("vllm:kv_cache_usage_perc", 0.0))
    return statistics.median(samples) * total if samples else float("nan")


def latency_cdf_plot(curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, lat in curves.items():
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=name)
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("CDF")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
