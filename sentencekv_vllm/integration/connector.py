"""Extension point: the KV connector API (v1): the host tier's scheduler -> worker channel, and the metrics path.

Attached to every SentenceKV server (``platform.prepare_config``), because vLLM's supported way to get
worker-side statistics onto the API server's ``/metrics`` is the connector's stats (``get_kv_connector_stats`` /
``build_kv_connector_stats`` / ``build_prom_metrics``, see :mod:`~sentencekv_vllm.integration.metrics`).

With ``offload: host`` it also carries the host tier. Scheduler role (EngineCore): registers the spec/manager pair,
learns each request's budget/policy (``get_num_new_matched_tokens``), and ships the manager's spill decisions in
the step's connector metadata (host slots are released on the scheduler side alone). Worker role:
``handle_preemptions`` runs first in ``execute_model``, before the forward, so the copies to host happen before
any freed block can be overwritten; it also updates each request's host-block map used by the sparse gather.
Without the host tier those hooks do nothing. With prefix caching on, the scheduler role installs the rules of
``prefix_cache.py`` (hits stop before the observation window; sparse-decoded tokens are not cached). No external
KV is ever loaded: ``get_num_new_matched_tokens`` always answers 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.memory import host_pool_bytes
from sentencekv_vllm.integration.tier.messages import Spill, host_block_bytes
from sentencekv_vllm.integration.tier.scheduler import ENGINE

logger = get_logger(__name__)
CONNECTOR_NAME = "SentenceKVConnector"
CONNECTOR_MODULE = "sentencekv_vllm.integration.connector"


@dataclass
class SentenceKVConnectorMetadata(KVConnectorMetadata):
    """One step's message from the host tier's scheduler side to its worker side (``tier/messages.py``)."""

    spills: list[Spill] = field(default_factory=list)


class SentenceKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.cfg = SentenceKVConfig.from_additional_config(vllm_config.additional_config)
        self.tiered = self.cfg.offload == "host"
        metrics.enable(self.cfg.stats)
        self.host_capacity = 0
        host_bytes = host_pool_bytes(self.cfg, vllm_config)
        if kv_cache_config is not None and self.tiered:
            self.host_capacity = host_bytes // max(1, host_block_bytes(kv_cache_config))
        if role == KVConnectorRole.SCHEDULER and self.tiered:
            from sentencekv_vllm.integration.tier import kv_spec

            kv_spec.register()
            ENGINE.configure(self.cfg, self.host_capacity, vllm_config.cache_config.block_size)
            logger.info("SentenceKV host tier: %d blocks (%.2f GiB)", self.host_capacity, host_bytes / 2**30)
        if role == KVConnectorRole.SCHEDULER and vllm_config.cache_config.enable_prefix_caching:
            from sentencekv_vllm.integration.compat import limit_prefix_cache
            from sentencekv_vllm.integration.prefix_cache import PrefixCacheRule

            rule = PrefixCacheRule(self.cfg, vllm_config.cache_config.block_size)
            limit_prefix_cache(rule.max_hit, rule.max_cached)

    @property
    def requires_kv_delivery(self) -> bool:
        return False    # a best-effort tier: nothing is handed off to another engine

    # -- scheduler side ------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        if self.tiered:
            ENGINE.on_request(request.request_id, request.sampling_params.extra_args, request.num_tokens)
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> SentenceKVConnectorMetadata:
        if not self.tiered:
            return SentenceKVConnectorMetadata()
        return SentenceKVConnectorMetadata(spills=ENGINE.take_pending())

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.tiered:
            ENGINE.forget(request.request_id)
        return False, None

    # -- both roles: statistics (this process's collector, drained every step) -----------------------------

    def get_kv_connector_stats(self) -> metrics.SentenceKVStats | None:
        """Called by vLLM every step: in the worker after the forward (or in a step without one), in EngineCore
        from ``update_from_output``. Gauges are re-read here so they are exact also when the engine goes idle."""
        if self.role == KVConnectorRole.WORKER:
            from sentencekv_vllm.integration.state import STATE

            metrics.snapshot_worker(**STATE.gauges())
        elif self.tiered:
            metrics.snapshot_scheduler(ENGINE.host_used)
        return metrics.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> metrics.SentenceKVStats:
        """API server: rebuild the stats from the payload vLLM shipped (for its periodic log line)."""
        return metrics.stats_from_payload(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> metrics.SentenceKVPromMetrics:
        """API server: the ``sentencekv_*`` series, registered next to vLLM's own."""
        return metrics.SentenceKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- worker side ---------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not self.tiered:
            return
        from sentencekv_vllm.integration.state import STATE
        from sentencekv_vllm.integration.tier.host_pool import HostPool

        STATE.attach_host(HostPool(kv_caches, self.host_capacity, prefault=self.cfg.host_prefault))

    def handle_preemptions(self, metadata: SentenceKVConnectorMetadata) -> None:
        if not self.tiered:
            return
        from sentencekv_vllm.integration.state import STATE

        STATE.apply_spills(metadata.spills)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None


def transfer_config() -> dict[str, Any]:
    """The ``--kv-transfer-config`` every SentenceKV server gets (metrics; the host tier with ``offload: host``)."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both"}
