"""Worker-side Prometheus series (prometheus-client).

They reach vLLM's ``/metrics`` when the server runs with ``PROMETHEUS_MULTIPROC_DIR`` set (vLLM then serves a
``MultiProcessCollector`` over every process's files); without it they stay in the worker and cost next to
nothing. Names are documented in the README.
"""

from __future__ import annotations

import os
from typing import Any

_M: dict[str, Any] | None = None
ATTENDED_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768)


def _metrics() -> dict[str, Any] | None:
    global _M
    if _M is None:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _M = {}
            return None
        from prometheus_client import Counter, Gauge, Histogram

        _M = {
            "attended": Histogram("sentencekv_attended_tokens", "Tokens attended per KV head by a sparse decode "
                                  "row (max over heads), layer 0", buckets=ATTENDED_BUCKETS),
            "attended_max": Gauge("sentencekv_attended_tokens_max", "Largest number of tokens a sparse decode row "
                                  "attended to since start", multiprocess_mode="max"),
            "sparse_rows": Counter("sentencekv_sparse_decode_rows", "Decode rows served by sparse attention"),
            "dense_rows": Counter("sentencekv_dense_decode_rows", "Decode rows served by the stock kernel"),
            "sentences": Histogram("sentencekv_prompt_sentences", "Sentences (units) per prompt",
                                   buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)),
            "segment_s": Histogram("sentencekv_segmentation_seconds", "Prompt segmentation time"),
            "select_s": Counter("sentencekv_selection_seconds", "Sparse decode: scoring units and filling the "
                                "budget (all layers)"),
            "attention_s": Counter("sentencekv_sparse_attention_seconds", "Sparse decode: gathering the selected "
                                   "K/V from the device cache and exact softmax attention (all layers)"),
            "budget": Gauge("sentencekv_budget_tokens", "Server token budget", multiprocess_mode="max"),
            "units": Gauge("sentencekv_live_units", "Sentence units held by live requests",
                           multiprocess_mode="livesum"),
            "index_bytes": Gauge("sentencekv_index_bytes", "Device bytes of the sentence index (centroid pool and "
                                 "running sums), allocated; outside vLLM's KV pool", multiprocess_mode="livesum"),
            "selected": Counter("sentencekv_selected_tokens", "Tokens selected by sparse rows (layer 0, all heads)"),
            "selected_host": Counter("sentencekv_selected_host_tokens", "Selected tokens read from the host tier "
                                     "(layer 0); hot-set hit rate = 1 - selected_host / selected"),
            "swap_in_bytes": Counter("sentencekv_swap_in_bytes", "Bytes of K/V read from the host tier (hot-set "
                                     "block loads and token-wise reads)"),
            "swap_in_blocks": Counter("sentencekv_swap_in_blocks", "Blocks copied from the host tier into device "
                                      "hot sets (per layer)"),
            "hot_hits": Counter("sentencekv_hot_set_hits", "Selected host-tier blocks found in the device hot set "
                                "(per layer); hit rate = hits / (hits + misses)"),
            "hot_misses": Counter("sentencekv_hot_set_misses", "Selected host-tier blocks not in the device hot set "
                                  "(per layer): swapped in, or read token-wise when the hot set is full"),
            "host_full": Counter("sentencekv_host_tier_full", "Spills cut short because the host tier was full "
                                 "(those blocks stay on the device)"),
            "preempt_releases": Counter("sentencekv_preempted_host_releases", "Preempted requests whose host-tier "
                                        "blocks were released"),
            "swap_out_bytes": Gauge("sentencekv_swap_out_bytes", "Bytes copied to the host tier since start",
                                    multiprocess_mode="livesum"),
            "host_blocks": Gauge("sentencekv_host_blocks", "Blocks held in the host tier (scheduler view)",
                                 multiprocess_mode="livesum"),
            "transfer_s": Counter("sentencekv_transfer_seconds", "Host tier: copying blocks out after prefill, "
                                  "hot-set swap-ins and token-wise host reads (all layers)"),
            "spilled": Counter("sentencekv_spilled_blocks", "Blocks moved from the device pool to the host tier"),
            "requests": Gauge("sentencekv_live_requests", "Requests with SentenceKV state",
                              multiprocess_mode="livesum"),
            "slot_violations": Counter("sentencekv_slot_invariant_violations", "Host-tier slot invariant "
                                       "violations found by the per-step check (a slot both free and the target "
                                       "of a pending spill, or held twice); must stay 0"),
        }
    return _M or None


def observe_step(plan: Any) -> None:
    m = _metrics()
    if not m:
        return
    from sentencekv_vllm.integration.state import STATE

    sparse = plan.stats.get("sparse_rows", 0)
    m["sparse_rows"].inc(sparse)
    if plan.book is not None:
        m["dense_rows"].inc(max(0, len(plan.book.tok) - sparse))
    m["budget"].set(STATE.cfg.budget)
    if STATE.host is not None:
        m["swap_out_bytes"].set(STATE.host.bytes_out)
    m["requests"].set(len(STATE.requests))
    if STATE.store is not None:
        m["units"].set(STATE.store.capacity - len(STATE.store.free_units))
        m["index_bytes"].set(STATE.store.nbytes())


def observe_segmentation(seconds: float, n_units: int) -> None:
    m = _metrics()
    if m:
        m["segment_s"].observe(seconds)
        m["sentences"].observe(n_units)


def observe_attended(counts: list[int]) -> None:
    m = _metrics()
    if not m:
        return
    for c in counts:       # only layer 0 reports counts
        m["attended"].observe(c)
    if counts:
        m["attended_max"].set(max(max(counts), m["attended_max"]._value.get()))


def observe_decode_phases(selection: float, attention: float, transfer: float) -> None:
    m = _metrics()
    if m:
        m["select_s"].inc(selection)
        m["attention_s"].inc(attention)
        if transfer:
            m["transfer_s"].inc(transfer)


def observe_swap_in(host_tokens: int, total_tokens: int, layer: int, bytes_per_token: int = 0) -> None:
    m = _metrics()
    if not m:
        return
    if layer == 0:
        m["selected"].inc(total_tokens)
        m["selected_host"].inc(host_tokens)
    if bytes_per_token:
        m["swap_in_bytes"].inc(host_tokens * bytes_per_token)


def observe_host_blocks(used: int, spilled: int = 0, preempted: bool = False, full: bool = False) -> None:
    """Scheduler side (EngineCore): host-tier occupancy is exact there, also when the engine goes idle."""
    m = _metrics()
    if m:
        m["host_blocks"].set(used)
        if full:
            m["host_full"].inc()
        if spilled:
            m["spilled"].inc(spilled)
        if preempted:
            m["preempt_releases"].inc()


def observe_hot_set(hits: int, misses: int, loaded: int, loaded_bytes: int) -> None:
    m = _metrics()
    if m:
        m["hot_hits"].inc(hits)
        m["hot_misses"].inc(misses)
        m["swap_in_blocks"].inc(loaded)
        m["swap_in_bytes"].inc(loaded_bytes)


def observe_transfer(seconds: float) -> None:
    m = _metrics()
    if m:
        m["transfer_s"].inc(seconds)


def observe_slot_violations(n: int) -> None:
    """Scheduler side (EngineCore): host-slot invariant violations found by ``EngineTier.check``."""
    m = _metrics()
    if m:
        m["slot_violations"].inc(n)
