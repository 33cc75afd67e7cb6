"""SentenceKV's Prometheus series, carried by vLLM's KV-connector stats path (no set-up needed).

Why this route: the numbers are produced in the worker (attention, selection, hot sets) and in EngineCore (host
tier), but ``/metrics`` is served by the API server. vLLM's supported channel between them is the KV connector's
stats: each process records into this module's per-process collector (``observe_*``), the SentenceKV connector
hands the collected :class:`SentenceKVStats` to vLLM every step (``get_kv_connector_stats``, worker and scheduler
role), vLLM aggregates them over workers and the scheduler, ships ``to_dict()`` to the API server inside
``SchedulerStats`` (msgpack), and vLLM's ``PrometheusStatLogger`` feeds them to :class:`SentenceKVPromMetrics`,
which the connector class builds there (``build_prom_metrics``). The series get vLLM's ``model_name`` / ``engine``
labels and live in the API server's own registry, so they appear on ``/metrics`` with or without
``PROMETHEUS_MULTIPROC_DIR`` (vLLM sets that itself for ``--api-server-count > 1``; the gauges declare a
multiprocess mode for it). Stats need vLLM's stats logging (off with ``--disable-log-stats``).

Payload (``SentenceKVStats.data``, plain str/number/list so it survives pickle and msgpack)::

    {"counter": {key: total}, "gauge": {key: value}, "histogram": {key: [observations]}}

Names are documented in the README's Metrics section.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from sentencekv_vllm.integration.log import get_logger

logger = get_logger(__name__)
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
KINDS = (COUNTER, GAUGE, HISTOGRAM)
ATTENDED_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384, 32768)
SENTENCE_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREFIX = "sentencekv_"
ATTENDED_MAX = "sentencekv_attended_tokens_max"     # API-server gauges (derived there, never in the payload)
BUDGET = "sentencekv_budget_tokens"


@dataclass(frozen=True)
class Series:
    """One exported series: ``key`` in the stats payload, Prometheus ``name`` (counters get ``_total`` on
    exposition), help text, and histogram buckets."""

    key: str
    kind: str
    name: str
    doc: str
    buckets: tuple[float, ...] = ()


SERIES: tuple[Series, ...] = (
    Series("attended", HISTOGRAM, "sentencekv_attended_tokens", "Tokens attended per KV head by a sparse decode "
           "row (max over heads), layer 0", ATTENDED_BUCKETS),
    Series("sentences", HISTOGRAM, "sentencekv_prompt_sentences", "Sentences (units) per prompt", SENTENCE_BUCKETS),
    Series("segment_s", HISTOGRAM, "sentencekv_segmentation_seconds", "Prompt segmentation time", SECONDS_BUCKETS),
    Series("sparse_rows", COUNTER, "sentencekv_sparse_decode_rows", "Decode rows served by sparse attention"),
    Series("dense_rows", COUNTER, "sentencekv_dense_decode_rows", "Decode rows served by the stock kernel"),
    Series("select_s", COUNTER, "sentencekv_selection_seconds", "Sparse decode: scoring units and filling the "
           "budget (all layers)"),
    Series("attention_s", COUNTER, "sentencekv_sparse_attention_seconds", "Sparse decode: gathering the selected "
           "K/V from the device cache and exact softmax attention (all layers)"),
    Series("selected", COUNTER, "sentencekv_selected_tokens", "Tokens selected by sparse rows (layer 0, all heads)"),
    Series("selected_host", COUNTER, "sentencekv_selected_host_tokens", "Selected tokens read from the host tier "
           "(layer 0); hot-set hit rate = 1 - selected_host / selected"),
    Series("swap_in_bytes", COUNTER, "sentencekv_swap_in_bytes", "Bytes of K/V read from the host tier (hot-set "
           "block loads and token-wise reads)"),
    Series("swap_out_bytes", COUNTER, "sentencekv_swap_out_bytes", "Bytes of K/V copied to the host tier"),
    Series("swap_in_blocks", COUNTER, "sentencekv_swap_in_blocks", "KV-head slices of blocks copied from the host "
           "tier into device hot sets (per layer)"),
    Series("hot_hits", COUNTER, "sentencekv_hot_set_hits", "Selected host-tier (block, KV head) pairs found in "
           "the device hot set (per layer); hit rate = hits / (hits + misses)"),
    Series("hot_misses", COUNTER, "sentencekv_hot_set_misses", "Selected host-tier (block, KV head) pairs not in "
           "the device hot set (per layer): swapped in, or read token-wise when the hot set is full"),
    Series("transfer_s", COUNTER, "sentencekv_transfer_seconds", "Host tier: copying blocks out after prefill, "
           "hot-set swap-ins and token-wise host reads (all layers)"),
    Series("spilled", COUNTER, "sentencekv_spilled_blocks", "Blocks moved from the device pool to the host tier"),
    Series("host_full", COUNTER, "sentencekv_host_tier_full", "Spills cut short because the host tier was full "
           "(those blocks stay on the device)"),
    Series("preempt_releases", COUNTER, "sentencekv_preempted_host_releases", "Preempted requests whose host-tier "
           "blocks were released"),
    Series("slot_violations", COUNTER, "sentencekv_slot_invariant_violations", "Host-tier slot invariant "
           "violations found by the per-step check (a slot both free and the target of a pending spill, or held "
           "twice); must stay 0"),
    Series("requests", GAUGE, "sentencekv_live_requests", "Requests with SentenceKV state (worker view)"),
    Series("units", GAUGE, "sentencekv_live_units", "Sentence units held by live requests (worker view)"),
    Series("index_bytes", GAUGE, "sentencekv_index_bytes", "Device bytes of the sentence index (centroid pool "
           "and running sums), allocated; outside vLLM's KV pool"),
    Series("host_blocks", GAUGE, "sentencekv_host_blocks", "Blocks held in the host tier (scheduler view)"),
)
BY_KEY: dict[str, Series] = {s.key: s for s in SERIES}


# -- the stats object (worker / EngineCore -> API server) ----------------------------------------------------


@dataclass
class SentenceKVStats(KVConnectorStats):
    """One interval's observations. Counters add up, gauges keep a snapshot (combined by max: tensor-parallel
    workers hold the same requests, so summing them would double-count), histograms keep every observation (the
    API server buckets them); ``reset`` empties it for the next interval."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for kind in KINDS:
            self.data.setdefault(kind, {})

    def reset(self) -> None:
        self.data = {kind: {} for kind in KINDS}

    def inc(self, key: str, value: float = 1) -> None:
        counters = self.data[COUNTER]
        counters[key] = counters.get(key, 0) + value

    def set(self, key: str, value: float) -> None:
        self.data[GAUGE][key] = value

    def observe(self, key: str, value: float) -> None:
        self.data[HISTOGRAM].setdefault(key, []).append(value)

    def aggregate(self, other: KVConnectorStats) -> SentenceKVStats:
        if other.is_empty():
            return self
        data = other.data
        for key, value in data.get(COUNTER, {}).items():
            self.inc(key, value)
        gauges = self.data[GAUGE]
        for key, value in data.get(GAUGE, {}).items():
            gauges[key] = max(gauges[key], value) if key in gauges else value
        for key, values in data.get(HISTOGRAM, {}).items():
            self.data[HISTOGRAM].setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        """A compact summary for vLLM's periodic "KV Transfer metrics" log line: totals, last gauges (max over
        the interval), histogram means."""
        out: dict[str, int | float] = {k: round(v, 4) for k, v in self.data[COUNTER].items() if v}
        out.update(self.data[GAUGE])
        for key, values in self.data[HISTOGRAM].items():
            if values:
                out[f"{key}_mean"] = round(sum(values) / len(values), 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(kind) for kind in KINDS)


def stats_from_payload(data: dict[str, Any] | None) -> SentenceKVStats:
    """Rebuild stats from a received payload. A deep copy: vLLM's logger aggregates into the first object of an
    interval, which must not alter the dict the Prometheus logger reads."""
    return SentenceKVStats(data=copy.deepcopy(data) if data else {})


# -- per-process collector -------------------------------------------------------------------------------------


class Collector:
    """What this process observed since vLLM last asked. Off until the SentenceKV connector exists here (nothing
    else would ever drain it); a lock because the inspector's RPC and async output threads may share the
    process with the forward."""

    def __init__(self) -> None:
        self.enabled = False
        self.lock = threading.Lock()
        self.stats = SentenceKVStats()
        self.swap_out_reported = 0

    def record(self, kind: str, key: str, value: float) -> None:
        if not self.enabled:
            return
        with self.lock:
            if kind == COUNTER:
                self.stats.inc(key, value)
            elif kind == GAUGE:
                self.stats.set(key, value)
            else:
                self.stats.observe(key, value)

    def take(self) -> SentenceKVStats | None:
        """Hand over everything collected so far and start a new interval (``None`` when there is nothing)."""
        with self.lock:
            if self.stats.is_empty():
                return None
            taken, self.stats = self.stats, SentenceKVStats()
            return taken


COLLECTOR = Collector()


def enable(on: bool = True) -> None:
    """Called by the SentenceKV connector (both roles): its ``get_kv_connector_stats`` drains the collector."""
    COLLECTOR.enabled = on


def take() -> SentenceKVStats | None:
    return COLLECTOR.take()


def _counter(key: str, value: float) -> None:
    if value:
        COLLECTOR.record(COUNTER, key, value)


# -- observation points (signatures used by planner, impl, the host tier) ---------------------------------------


def observe_step(sparse_rows: int, decode_rows: int) -> None:
    """Worker, once per step (planner): sparse vs dense decode rows (of the indexed decode rows)."""
    if not COLLECTOR.enabled:
        return
    _counter("sparse_rows", sparse_rows)
    _counter("dense_rows", max(0, decode_rows - sparse_rows))


def snapshot_worker(requests: int, units: int | None = None, index_bytes: int | None = None,
                    swap_out_bytes: int | None = None) -> None:
    """Worker gauges (``WorkerState.gauges``), read when vLLM collects the step's stats (after ``_update_states``
    dropped finished requests, also in steps without a forward), so they are exact once the engine goes idle.
    ``swap_out_bytes`` is the host pool's running total; the counter gets its growth."""
    if not COLLECTOR.enabled:
        return
    COLLECTOR.record(GAUGE, "requests", requests)
    if units is not None:
        COLLECTOR.record(GAUGE, "units", units)
        COLLECTOR.record(GAUGE, "index_bytes", index_bytes or 0)
    if swap_out_bytes is not None:
        _counter("swap_out_bytes", swap_out_bytes - COLLECTOR.swap_out_reported)
        COLLECTOR.swap_out_reported = swap_out_bytes


def snapshot_scheduler(host_used: int) -> None:
    """EngineCore: host-tier occupancy, exact there every step."""
    COLLECTOR.record(GAUGE, "host_blocks", host_used)


def observe_segmentation(seconds: float, n_units: int) -> None:
    COLLECTOR.record(HISTOGRAM, "segment_s", seconds)
    COLLECTOR.record(HISTOGRAM, "sentences", n_units)


def observe_attended(counts: list[int]) -> None:
    """Layer 0 only: tokens each sparse row attended to (max over KV heads)."""
    for c in counts:
        COLLECTOR.record(HISTOGRAM, "attended", c)


def observe_decode_phases(selection: float, attention: float, transfer: float) -> None:
    _counter("select_s", selection)
    _counter("attention_s", attention)
    _counter("transfer_s", transfer)


def observe_swap_in(host_tokens: int, total_tokens: int, layer: int, bytes_per_token: int = 0) -> None:
    if layer == 0:
        _counter("selected", total_tokens)
        _counter("selected_host", host_tokens)
    if bytes_per_token:
        _counter("swap_in_bytes", host_tokens * bytes_per_token)


def observe_host_blocks(used: int, spilled: int = 0, preempted: bool = False, full: bool = False) -> None:
    """Scheduler side (EngineCore): host-tier events; occupancy is also re-read every step by the connector."""
    COLLECTOR.record(GAUGE, "host_blocks", used)
    _counter("host_full", int(full))
    _counter("spilled", spilled)
    _counter("preempt_releases", int(preempted))


def observe_hot_set(hits: int, misses: int, loaded: int, loaded_bytes: int) -> None:
    _counter("hot_hits", hits)
    _counter("hot_misses", misses)
    _counter("swap_in_blocks", loaded)
    _counter("swap_in_bytes", loaded_bytes)


def observe_transfer(seconds: float) -> None:
    _counter("transfer_s", seconds)


def observe_slot_violations(n: int) -> None:
    """Scheduler side (EngineCore): host-slot invariant violations found by ``EngineTier.check``."""
    _counter("slot_violations", n)


# -- API server: Prometheus series -----------------------------------------------------------------------------


class SentenceKVPromMetrics(KVConnectorPromMetrics):
    """The ``sentencekv_*`` series in the API server, labelled like vLLM's own (``model_name``, ``engine``).
    Built once by vLLM's ``PrometheusStatLogger`` through the connector's ``build_prom_metrics``; ``observe``
    gets each step's aggregated payload with its engine index."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_previous()
        self.children: dict[str, dict[int, Any]] = {s.key: self._per_engine(self._create(s)) for s in SERIES}
        self.attended_max = self._per_engine(self._gauge_cls(
            name=ATTENDED_MAX, documentation="Largest number of tokens a sparse decode row attended to since start",
            labelnames=labelnames, multiprocess_mode="mostrecent"))
        self.attended_peak: dict[int, float] = dict.fromkeys(per_engine_labelvalues, 0.0)
        budget = self._per_engine(self._gauge_cls(name=BUDGET, documentation="Server token budget",
                                                  labelnames=labelnames, multiprocess_mode="mostrecent"))
        for child in budget.values():
            child.set(server_budget(vllm_config))

    def _create(self, s: Series) -> Any:
        if s.kind == COUNTER:
            return self._counter_cls(name=s.name, documentation=s.doc, labelnames=self._labelnames)
        if s.kind == GAUGE:
            return self._gauge_cls(name=s.name, documentation=s.doc, labelnames=self._labelnames,
                                   multiprocess_mode="mostrecent")
        return self._histogram_cls(name=s.name, documentation=s.doc, labelnames=self._labelnames,
                                   buckets=list(s.buckets))

    def _per_engine(self, metric: Any) -> dict[int, Any]:
        """Children created up front, so every series exists (at 0) from start-up on."""
        return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.get(COUNTER, {}).items():
            if (child := self._child(key, engine_idx)) is not None:
                child.inc(value)
        for key, value in transfer_stats_data.get(GAUGE, {}).items():
            if (child := self._child(key, engine_idx)) is not None:
                child.set(value)
        for key, values in transfer_stats_data.get(HISTOGRAM, {}).items():
            if (child := self._child(key, engine_idx)) is not None:
                for value in values:
                    child.observe(value)
        attended = transfer_stats_data.get(HISTOGRAM, {}).get("attended")
        if attended:
            peak = self.attended_peak[engine_idx] = max(self.attended_peak.get(engine_idx, 0.0), *attended)
            self.attended_max[engine_idx].set(peak)

    def _child(self, key: str, engine_idx: int) -> Any:
        children = self.children.get(key)
        if children is None:     # a worker of another plugin version: never fail vLLM's logger over it
            logger.warning_once("SentenceKV: unknown stats key %r ignored", key)
            return None
        return children[engine_idx]


def server_budget(vllm_config: Any) -> int:
    from sentencekv_vllm.config import SentenceKVConfig

    return SentenceKVConfig.from_additional_config(vllm_config.additional_config).budget


def _unregister_previous() -> None:
    """vLLM re-creates its logger's series after dropping its own ``vllm:`` collectors
    (``unregister_vllm_metrics``); drop ours the same way, or a second logger in one process would fail with
    "Duplicated timeseries"."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)

