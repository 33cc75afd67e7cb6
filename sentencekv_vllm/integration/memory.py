"""SentenceKV's memory inside vLLM's budget: the sentence index reserved at start-up, and the host tier's size.

Why: vLLM sizes the KV cache from what its memory profiler sees (``Worker.determine_available_memory``: weights,
activations of a dummy forward, CUDA graphs). The centroid index is SentenceKV's own device tensor, written in the
forward and unseen by the profiler; left to grow on demand it lands on top of a KV cache that already took
``gpu_memory_utilization`` of the device, and a doubling growth briefly holds old and new together. So the worker
takes the index off the KV memory before vLLM sizes the pool (:class:`IndexReservingWorker`), and allocates it
once, at start-up, for every token the pools can hold (device blocks + host tier) at ``index_tokens_per_unit``
tokens per sentence. The per-step workspaces of the sparse path are reserved the same way.

The host tier's default size follows the host (half of the RAM available at start-up, less the KV cache on a CPU
server, where host and device are the same memory) and the model (never more than every request's whole context).
It is resolved once, in the API server, and travels to every process in the KV connector's extra config, so the
scheduler and the workers agree on the number of host slots.
"""

from __future__ import annotations

import math
import os
from typing import Any

import psutil

from sentencekv_vllm import policies
from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.core.index import index_dtype
from sentencekv_vllm.integration.log import get_logger

HOST_POOL_KEY = "sentencekv_host_pool_bytes"    # kv_connector_extra_config key (resolved host tier size)
HOST_RAM_SHARE = 0.5                            # auto host tier: at most this share of the available RAM
_GIB = 2**30


def unit_bytes(cfg: SentenceKVConfig, layers: int, kv_heads: int, head_dim: int, feature_bytes: int = 4) -> int:
    """Device bytes one unit (sentence or page) takes in the index: the features of each pool slot
    (``feature_bytes`` per element, :func:`index_dtype`), every layer and KV head, plus its ``valid`` flags."""
    slots = len(policies.pool_slots(policies.get(cfg.policy).units)[0])
    return layers * kv_heads * (head_dim * feature_bytes * slots + 1)


def tokens_per_unit(cfg: SentenceKVConfig) -> int:
    """Tokens the index is sized for per unit: ``index_tokens_per_unit`` (Quest: its page size, exactly)."""
    return cfg.quest_page_size if policies.get(cfg.policy).units == "pages" else cfg.index_tokens_per_unit


def index_capacity(cfg: SentenceKVConfig, pool_tokens: int, max_seqs: int) -> int:
    """Units to allocate for ``pool_tokens`` tokens of KV (device + host), plus two per request slot for each
    request's short last prompt sentence and its open one."""
    return math.ceil(pool_tokens / tokens_per_unit(cfg)) + 2 * max_seqs


def workspace_bytes(cfg: SentenceKVConfig, max_seqs: int, kv_heads: int, q_heads: int, head_dim: int,
                    kv_bytes: int) -> int:
    """Upper bound of one sparse decode step's transient tensors (one layer at a time): the exact path gathers
    ``τ`` keys and values per row and KV head (model dtype) and scores them per query head in float32."""
    gathered = max_seqs * kv_heads * cfg.budget * head_dim * 2 * kv_bytes
    scores = max_seqs * q_heads * cfg.budget * 4 * 2
    return gathered + scores


def reservation(cfg: SentenceKVConfig, available: int, dims: tuple[int, int, int, int], kv_token_bytes: int,
                kv_bytes: int, host_tokens: int, max_seqs: int, feature_bytes: int = 4) -> tuple[int, int]:
    """(bytes to take off vLLM's KV memory, units they hold) when ``available`` bytes would all go to KV.

    The device pool then holds ``d`` tokens with ``d * kv_token_bytes + index(d + host_tokens) + workspace =
    available``; solved for ``d`` so the reservation is exact rather than sized for memory the KV no longer gets.
    """
    layers, kv_heads, q_heads, head_dim = dims
    per_unit = unit_bytes(cfg, layers, kv_heads, head_dim, feature_bytes)
    work = workspace_bytes(cfg, max_seqs, kv_heads, q_heads, head_dim, kv_bytes)
    per_token_index = per_unit / tokens_per_unit(cfg)
    fixed = index_capacity(cfg, host_tokens, max_seqs) * per_unit + work
    device_tokens = max(0, int((available - fixed) / (kv_token_bytes + per_token_index)))
    units = index_capacity(cfg, device_tokens + host_tokens, max_seqs)
    return min(available, units * per_unit + work), units


def auto_host_pool_bytes(vllm_config: Any, cpu: bool) -> int:
    """Default host tier size: ``HOST_RAM_SHARE`` of the RAM available now (less the CPU KV cache, which is
    allocated later from the same RAM), capped by what every request's whole context can need."""
    from sentencekv_vllm.integration.compat import model_dims

    layers, kv_heads, _, head_dim = model_dims(vllm_config)
    dtype_bytes = vllm_config.model_config.dtype.itemsize
    token_bytes = 2 * layers * kv_heads * head_dim * dtype_bytes
    model_cap = vllm_config.scheduler_config.max_num_seqs * vllm_config.model_config.max_model_len * token_bytes
    free = psutil.virtual_memory().available - (_cpu_kv_bytes(vllm_config) if cpu else 0)
    return max(_GIB // 4, min(model_cap, int(HOST_RAM_SHARE * free)))


def _cpu_kv_bytes(vllm_config: Any) -> int:
    """The CPU KV cache the worker will allocate from the same RAM (vLLM's CPU worker: ``kv_cache_memory_bytes``,
    which ``VLLM_CPU_KVCACHE_SPACE`` sets, else ``gpu_memory_utilization`` of the total)."""
    cache = vllm_config.cache_config
    if cache.kv_cache_memory_bytes:
        return int(cache.kv_cache_memory_bytes)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * _GIB
    return int(psutil.virtual_memory().total * cache.gpu_memory_utilization)


def resolve_host_pool(cfg: SentenceKVConfig, vllm_config: Any, extra: dict[str, Any], cpu: bool) -> None:
    """Write the host tier's size into the connector's extra config (once: the API server's value wins)."""
    if cfg.offload != "host" or HOST_POOL_KEY in extra:
        return
    if cfg.host_pool_gib is not None:
        extra[HOST_POOL_KEY] = int(cfg.host_pool_gib * _GIB)
        return
    extra[HOST_POOL_KEY] = auto_host_pool_bytes(vllm_config, cpu)
    get_logger(__name__).info("SentenceKV: host tier %.2f GiB (host_pool_gib unset: %.0f%% of the available RAM, "
                              "at most every request's whole context)", extra[HOST_POOL_KEY] / _GIB,
                              100 * HOST_RAM_SHARE)


def host_pool_bytes(cfg: SentenceKVConfig, vllm_config: Any) -> int:
    """The resolved host tier size in bytes (0 without the tier)."""
    if cfg.offload != "host":
        return 0
    extra = (vllm_config.kv_transfer_config.kv_connector_extra_config or {}) if vllm_config.kv_transfer_config else {}
    if HOST_POOL_KEY in extra:
        return int(extra[HOST_POOL_KEY])
    return int((cfg.host_pool_gib or 4.0) * _GIB)


class IndexReservingWorker:
    """Worker mixin (CPU and GPU workers): reserve the index when vLLM sizes the KV cache, allocate it after."""

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()  # type: ignore[misc]
        reserved, units = self._index_reservation(available)
        get_logger(__name__).info("SentenceKV: %.1f MiB of KV memory reserved for the sentence index (%d units) and "
                                  "the sparse step's workspace", reserved / 2**20, units)
        return available - reserved

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        super().initialize_from_config(kv_cache_config)  # type: ignore[misc]
        from sentencekv_vllm.integration.state import STATE

        max_seqs = self.vllm_config.scheduler_config.max_num_seqs  # type: ignore[attr-defined]
        STATE.reserve_index(index_capacity(STATE.cfg, self._pool_tokens(kv_cache_config.num_blocks), max_seqs))

    def _token_bytes(self) -> tuple[int, int]:
        """(KV bytes per token over all layers, bytes per element), from the runner's own KV specs."""
        specs = list(self.get_kv_cache_spec().values())  # type: ignore[attr-defined]
        per_token = sum(spec.page_size_bytes for spec in specs) // specs[0].block_size
        return per_token, specs[0].dtype.itemsize

    def _host_tokens(self, per_token: int) -> int:
        from sentencekv_vllm.integration.state import STATE

        return host_pool_bytes(STATE.cfg, self.vllm_config) // max(1, per_token)  # type: ignore[attr-defined]

    def _index_reservation(self, available: int) -> tuple[int, int]:
        """(bytes, units). The server's config is ``STATE.cfg``, parsed by ``attach_runner`` in ``init_device``,
        before vLLM sizes the KV cache."""
        from sentencekv_vllm.integration.compat import model_dims
        from sentencekv_vllm.integration.state import STATE

        vc = self.vllm_config  # type: ignore[attr-defined]
        per_token, elem = self._token_bytes()
        return reservation(STATE.cfg, available, model_dims(vc), per_token, elem, self._host_tokens(per_token),
                           vc.scheduler_config.max_num_seqs, index_dtype(vc.model_config.dtype).itemsize)

    def _pool_tokens(self, num_blocks: int) -> int:
        per_token, _ = self._token_bytes()
        return num_blocks * self.vllm_config.cache_config.block_size + self._host_tokens(per_token)  # type: ignore
