"""Every touch of a private vLLM 0.32 API lives here, so a vLLM upgrade is reviewed in one file.

Used: the V1 GPU/CPU model runner's ``input_batch`` (``req_ids``, ``token_ids_cpu``, ``num_prompt_tokens``,
``num_tokens_no_spec``), its
``requests`` dict (sampling params), the no-op hook ``_on_request_state_removed``, ``_update_states`` (to see
``SchedulerOutput.preempted_req_ids``), the CPU attention custom ops (``cpu_attn_get_scheduler_metadata``,
``cpu_attention_with_kv_cache`` with the stock impl's arguments), and
``KVCacheSpecRegistry._ensure_registered`` (built-in specs first, so ours does not shadow them), and
``KVCacheManager.get_computed_blocks`` / ``truncate_computed_blocks`` and ``KVCacheCoordinator.cache_blocks``
(``limit_prefix_cache``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class RowInfo:
    """What the planner needs to know about batch row ``i`` (row order == attention metadata row order)."""

    req_id: str
    prompt_len: int
    token_ids: np.ndarray       # view of the request's token-id row (prompt + generated so far, then padding)
    num_tokens: int             # known tokens (prompt + generated so far)
    extra_args: dict[str, Any] | None


def runner_rows(runner: Any, num_reqs: int) -> list[RowInfo]:
    batch = runner.input_batch
    if not hasattr(batch, "req_ids"):
        raise RuntimeError("SentenceKV needs vLLM's V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0")
    rows = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        sp = getattr(state, "sampling_params", None)
        rows.append(RowInfo(
            req_id=req_id,
            prompt_len=int(batch.num_prompt_tokens[i]),
            token_ids=batch.token_ids_cpu[i],
            num_tokens=int(batch.num_tokens_no_spec[i]),
            extra_args=getattr(sp, "extra_args", None),
        ))
    return rows


def on_request_removed(runner: Any, callback: Callable[[str, list[int]], None]) -> None:
    """Call ``callback(req_id, all_token_ids)`` when the runner drops a finished or aborted request."""
    original = runner._on_request_state_removed

    def hook(req_id: str, req_state: Any) -> None:
        # req_state is None for a request finished (e.g. aborted) before the runner ever saw it
        tokens = [] if req_state is None else (list(req_state.prompt_token_ids or [])
                                               + list(req_state.output_token_ids or []))
        callback(req_id, tokens)
        original(req_id, req_state)

    runner._on_request_state_removed = hook


def on_requests_preempted(runner: Any, callback: Callable[[str], None]) -> None:
    """Call ``callback(req_id)`` for each request the scheduler preempted since the last step, before the runner
    updates its batch.

    Why: the V1 runner keeps a preempted request's cached state until it resumes (with a full recompute) and
    fires ``_on_request_state_removed`` only on finish/abort, so per-request state sized to ``max_num_seqs`` would
    stay held by requests that wait while new ones are admitted. vLLM 0.32's scheduler lists them in
    ``SchedulerOutput.preempted_req_ids`` every step (documented for the V2 runner; V1 ignores it).
    """
    original = runner._update_states

    def update_states(scheduler_output: Any) -> Any:
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            callback(req_id)
        return original(scheduler_output)

    runner._update_states = update_states


def cpu_scheduler_metadata(builder: Any, num_reqs: int, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           heads: tuple[int, int] | None = None) -> torch.Tensor:
    """CPU attention work partition for a (sub-)batch; must be rebuilt whenever ``seq_lens`` change.
    ``heads`` = (query heads, KV heads) per sequence when they differ from the layer's (the head-split view); such
    a batch is never split along the KV axis, so each sequence's reduction order (and result) does not depend on
    what else is in the batch: the head-split batch already has ``rows x KV heads`` sequences to spread."""
    from vllm import _custom_ops as ops
    from vllm import envs

    num_heads, num_kv_heads = heads or (builder.num_heads, builder.num_kv_heads)
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=builder.head_dim, seq_lens=seq_lens, dtype=builder.dtype, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=builder.window_size, isa=builder.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV and heads is None, dynamic_causal=None,
        kv_cache_dtype=builder.kv_cache_dtype)


def cpu_attention(impl: Any, layer: Any, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  output: torch.Tensor, metadata: Any) -> None:
    """CPU_ATTN's decode kernel with the arguments ``CPUAttentionBackendImpl.forward`` passes it (vLLM 0.32),
    on caches already split into key and value views."""
    _cpu_attention_op()(
        query, key_cache, value_cache, output, metadata.query_start_loc, metadata.seq_lens, impl.scale,
        metadata.causal, impl.alibi_slopes, impl.sliding_window, metadata.block_table, impl.logits_soft_cap,
        metadata.scheduler_metadata, impl.sinks, metadata.dynamic_causal, layer._k_scale_float,
        layer._v_scale_float, impl.kv_cache_dtype)


@functools.cache
def _cpu_attention_op() -> Any:
    """The kernel's overload itself, called with positional arguments in the order of vLLM 0.32's
    ``_custom_ops.cpu_attention_with_kv_cache``: its Python wrapper, keyword arguments and overload resolution cost
    ~15 us a call on a cold cache, a tenth of the kernel on a short selection (called once per sparse layer)."""
    import vllm._custom_ops  # noqa: F401  (loads the ``_C`` library that registers the op)

    return torch.ops._C.cpu_attention_with_kv_cache.default


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def install_request_validator(validate: Callable[[dict[str, Any]], None]) -> None:
    """Validate ``vllm_xargs`` where vLLM validates sampling parameters (API server), so a bad per-request
    override gets vLLM's 400 instead of reaching the engine. ``validate`` raises ``ValueError``."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args
    if getattr(original, "_sentencekv", False):
        return

    def verify_extra_args(self: SamplingParams) -> None:
        original(self)
        if self.extra_args:
            try:
                validate(self.extra_args)
            except ValueError as err:
                raise VLLMValidationError(str(err), parameter="vllm_xargs") from None

    verify_extra_args._sentencekv = True  # type: ignore[attr-defined]
    SamplingParams._verify_extra_args = verify_extra_args


def model_dims(vllm_config: Any) -> tuple[int, int, int, int]:
    """(layers, KV heads, query heads, head dim) per worker, from the model config: one source for every backend
    (the CPU and FlashAttention builders name these attributes differently)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return (mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_num_attention_heads(pc), mc.get_head_size())


def model_device(runner: Any) -> torch.device:
    """The device the model runner keeps the model and KV cache on."""
    return torch.device(runner.device)


def register_kv_spec(spec: type, manager: type, base: type) -> None:
    """Map a KV cache spec to its manager in vLLM's spec registry (the built-in entries must exist first, or the
    registry's lazy init would overwrite ours)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec, manager, uniform_type_base_spec=base)


def limit_prefix_cache(max_hit: Callable[[Any], int], max_cached: Callable[[Any], int | None]) -> None:
    """Limit every local prefix-cache hit to ``max_hit(request)`` tokens (a multiple of the block size), and cache
    only a request's first ``max_cached(request)`` tokens (``None``: all).

    Why here: vLLM's scheduler asks ``KVCacheManager.get_computed_blocks`` for a new (or resumed) request's cached
    prefix and takes the answer as is (a KV connector can add external tokens, not shorten a local hit); the lookup
    has no side effects (ref counts are taken later, in ``allocate_slots``), so trimming its answer with the
    manager's own ``truncate_computed_blocks`` is safe. Every block that becomes reusable goes through
    ``KVCacheCoordinator.cache_blocks(request, num_tokens)`` (no subclass overrides it in 0.32). Installed once per
    process (EngineCore); installing again replaces the rules.
    """
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    lookup = _original(KVCacheManager.get_computed_blocks)
    cache = _original(KVCacheCoordinator.cache_blocks)

    def get_computed_blocks(self: KVCacheManager, request: Any) -> tuple[Any, int, int]:
        blocks, hit, boundary = lookup(self, request)
        cap = max_hit(request)
        if hit <= cap:
            return blocks, hit, boundary
        if cap <= 0:
            return self.empty_kv_cache_blocks, 0, 0
        return self.truncate_computed_blocks(blocks, cap), cap, 0

    def cache_blocks(self: KVCacheCoordinator, request: Any, num_computed_tokens: int) -> None:
        limit = max_cached(request)
        cache(self, request, num_computed_tokens if limit is None else min(num_computed_tokens, limit))

    get_computed_blocks._sentencekv_original = lookup  # type: ignore[attr-defined]
    cache_blocks._sentencekv_original = cache  # type: ignore[attr-defined]
    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheCoordinator.cache_blocks = cache_blocks


def _original(method: Callable) -> Callable:
    """The engine's own method under a SentenceKV wrapper (so installing twice does not stack wrappers)."""
    return getattr(method, "_sentencekv_original", method)
