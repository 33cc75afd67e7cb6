"""Issue #17: the sentencekv_* series travel as KV-connector stats (worker / EngineCore -> API server).

Real objects throughout: the stats class, vLLM's own transport types (pickled ``KVConnectorOutput`` from the
worker, msgpack-encoded ``EngineCoreOutputs`` to the API server) and vLLM's ``PrometheusStatLogger`` built from a
real ``VllmConfig`` of the test model with the SentenceKV connector configured.
"""

from __future__ import annotations

import pickle

import pytest
from prometheus_client import REGISTRY, generate_latest
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.connector import SentenceKVConnector
from sentencekv_vllm.integration.metrics import COUNTER, GAUGE, HISTOGRAM, SentenceKVStats
from tests.server import metric


@pytest.fixture
def collector():
    """This process's collector, enabled and empty; left disabled and empty afterwards."""
    metrics.enable()
    metrics.take()
    yield metrics.COLLECTOR
    metrics.take()
    metrics.enable(False)


def _stats(counters=None, gauges=None, hist=None) -> SentenceKVStats:
    return SentenceKVStats(data={COUNTER: dict(counters or {}), GAUGE: dict(gauges or {}),
                                 HISTOGRAM: {k: list(v) for k, v in (hist or {}).items()}})


def test_aggregate_sums_counters_keeps_max_gauge_and_all_observations():
    a = _stats({"sparse_rows": 3, "select_s": 0.5}, {"requests": 2}, {"attended": [100, 200]})
    b = _stats({"sparse_rows": 4, "dense_rows": 1}, {"requests": 1, "host_blocks": 9}, {"attended": [300]})
    out = a.aggregate(b)
    assert out is a
    assert out.data[COUNTER] == {"sparse_rows": 7, "select_s": 0.5, "dense_rows": 1}
    assert out.data[GAUGE] == {"requests": 2, "host_blocks": 9}
    assert out.data[HISTOGRAM] == {"attended": [100, 200, 300]}
    assert b.data[COUNTER] == {"sparse_rows": 4, "dense_rows": 1}, "the other side must stay untouched"
    assert a.aggregate(SentenceKVStats()) is a and a.data[COUNTER]["sparse_rows"] == 7


def test_empty_reset_and_reduce():
    s = SentenceKVStats()
    assert s.is_empty() and s.data == {COUNTER: {}, GAUGE: {}, HISTOGRAM: {}}
    s.inc("sparse_rows", 2)
    s.set("requests", 3)
    s.observe("attended", 128)
    s.observe("attended", 256)
    assert not s.is_empty()
    assert s.reduce() == {"sparse_rows": 2, "requests": 3, "attended_mean": 192.0}
    s.reset()
    assert s.is_empty()


def test_collector_hands_over_once_and_records_nothing_when_disabled(collector):
    metrics.observe_attended([64, 512])
    metrics.observe_decode_phases(selection=0.25, attention=0.5, transfer=0.0)
    metrics.observe_host_blocks(5, spilled=3, full=True)
    metrics.observe_segmentation(0.01, 12)
    taken = metrics.take()
    assert taken is not None
    assert taken.data[COUNTER] == {"select_s": 0.25, "attention_s": 0.5, "host_full": 1, "spilled": 3}
    assert taken.data[GAUGE] == {"host_blocks": 5}
    assert taken.data[HISTOGRAM] == {"attended": [64, 512], "segment_s": [0.01], "sentences": [12]}
    assert metrics.take() is None, "the interval was reset"
    metrics.enable(False)
    metrics.observe_attended([64])
    metrics.observe_slot_violations(1)
    assert metrics.take() is None


def test_payload_survives_vllm_transport_worker_to_api_server():
    """Worker -> EngineCore: pickled ``KVConnectorOutput``; EngineCore -> API server: ``SchedulerStats`` inside
    msgpack-encoded ``EngineCoreOutputs``; the API server rebuilds stats through the connector class."""
    worker = _stats({"sparse_rows": 5, "swap_in_bytes": 4096}, {"requests": 2, "index_bytes": 1 << 20},
                    {"attended": [96, 480], "segment_s": [0.0125]})
    received = pickle.loads(pickle.dumps(KVConnectorOutput(kv_connector_stats=worker))).kv_connector_stats
    assert isinstance(received, SentenceKVStats) and received.data == worker.data
    merged = received.aggregate(_stats({"spilled": 3}, {"host_blocks": 7}))
    out = EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=merged.to_dict()))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(out))
    payload = decoded.scheduler_stats.kv_connector_stats
    assert payload == merged.data
    rebuilt = SentenceKVConnector.build_kv_connector_stats(payload)
    rebuilt.inc("sparse_rows", 1)
    assert payload[COUNTER]["sparse_rows"] == 5, "rebuilding must not alias the received payload"


@pytest.fixture(scope="module")
def stat_logger(model_path):
    """vLLM's own Prometheus logger for a config that names the SentenceKV connector (as every SentenceKV server
    does): it must build the sentencekv_* series through ``build_prom_metrics``."""
    from vllm.config import KVTransferConfig, ModelConfig, VllmConfig
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from sentencekv_vllm.integration.connector import transfer_config

    cfg = VllmConfig(model_config=ModelConfig(model=model_path, served_model_name="smollm2"),
                     kv_transfer_config=KVTransferConfig(**transfer_config()),
                     additional_config={"sentencekv": {"budget": 384}})
    return PrometheusStatLogger(cfg)


def _labelled(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_vllm_prometheus_logger_exports_series_with_vllm_labels(stat_logger, collector):
    text = generate_latest(REGISTRY).decode()
    assert metric(text, "sentencekv_budget_tokens") == 384, "the budget is known from start-up on"
    assert _labelled(text, "sentencekv_sparse_decode_rows_total"), "series exist (at 0) before any step"
    before = metric(text, "sentencekv_sparse_decode_rows_total")
    for step in range(2):
        metrics.observe_attended([200, 700 - step * 500])
        metrics.observe_host_blocks(11 - step)
        stats = metrics.take()
        stats.inc("sparse_rows", 2)
        payload = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(
            EngineCoreOutputs(scheduler_stats=SchedulerStats(kv_connector_stats=stats.to_dict()))))
        stat_logger.record(payload.scheduler_stats, None)
    text = generate_latest(REGISTRY).decode()
    assert metric(text, "sentencekv_sparse_decode_rows_total") == before + 4
    assert metric(text, "sentencekv_host_blocks") == 10, "a gauge shows the latest step"
    assert metric(text, "sentencekv_attended_tokens_max") == 700
    assert metric(text, "sentencekv_attended_tokens_count") >= 4
    line = _labelled(text, "sentencekv_sparse_decode_rows_total")[0]
    assert 'model_name="smollm2"' in line and 'engine="0"' in line
    assert 'le="256.0"' in " ".join(_labelled(text, "sentencekv_attended_tokens_bucket"))


def test_every_sentencekv_server_gets_the_connector_unless_the_user_brought_one(model_path):
    """The stats need SentenceKV's connector on every server, with or without the host tier; a user's connector
    is kept without the host tier (series not exported) and refused with it."""
    from vllm.config import KVTransferConfig, ModelConfig, VllmConfig

    from sentencekv_vllm.config import SentenceKVConfig
    from sentencekv_vllm.integration.connector import CONNECTOR_NAME
    from sentencekv_vllm.integration.platform import _install_connector

    model = ModelConfig(model=model_path)
    plain = VllmConfig(model_config=model)
    _install_connector(plain, SentenceKVConfig())
    assert plain.kv_transfer_config.kv_connector == CONNECTOR_NAME and plain.kv_transfer_config.kv_role == "kv_both"
    _install_connector(plain, SentenceKVConfig())                  # EngineCore re-runs the hook: idempotent
    assert plain.kv_transfer_config.kv_connector == CONNECTOR_NAME
    theirs = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    user = VllmConfig(model_config=model, kv_transfer_config=theirs)
    _install_connector(user, SentenceKVConfig())
    assert user.kv_transfer_config.kv_connector == "ExampleConnector"
    with pytest.raises(ValueError, match="offload: 'host' uses its own KV connector"):
        _install_connector(user, SentenceKVConfig(offload="host"))
