"""Extension points: ``KVCacheSpec`` + ``SingleTypeKVCacheManager`` (the host tier's scheduler side).

With ``offload: host`` the backend reports :class:`SentenceKVSpec` (``customize_spec`` -> :func:`offload_spec`, in
the worker), which the registry maps to
:class:`SentenceKVManager`. Once a request decodes sparsely (context >= ``sparse_from``, prefill done), the manager
frees its *middle* blocks -- everything but the sink blocks, the recent window and the request's hot-set blocks --
back to vLLM's pool, like R-SWA frees a gap. Before that, it takes a host slot for each middle block from
``tier.scheduler.ENGINE``, and the KV connector tells the worker to copy the block to that slot before anything
can overwrite it. Hot-set blocks stay allocated (and counted by vLLM) as device cache space.
When the host tier is full, blocks simply stay resident (no crash, no wrong tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration.compat import register_kv_spec
from sentencekv_vllm.integration.tier.scheduler import ENGINE


@dataclass(frozen=True, kw_only=True)
class SentenceKVSpec(FullAttentionSpec):
    """Full attention whose middle blocks may move to the host tier after prefill."""


class SentenceKVManager(FullAttentionManager):
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        if num_prompt_tokens is None or request_id not in self.req_to_blocks:
            return
        first, last = ENGINE.spill_range(request_id, processed_computed_tokens)
        blocks = self.req_to_blocks[request_id]
        done = ENGINE.already_spilled(request_id)
        candidates = [i for i in range(first, min(last, len(blocks)))
                      if i not in done and not blocks[i].is_null and blocks[i].ref_cnt == 1]
        if not candidates:
            return
        slots = ENGINE.take_host_slots(request_id, len(candidates))
        if not slots:
            return      # host tier full: keep these blocks resident
        spilled = candidates[:len(slots)]
        kept = ENGINE.keep_on_device(request_id, spilled)
        ENGINE.record_spill(request_id, [(i, blocks[i].block_id, s, i in kept)
                                         for i, s in zip(spilled, slots, strict=True)])
        freed = [blocks[i] for i in spilled if i not in kept]
        for i in spilled:
            if i not in kept:
                blocks[i] = self._null_block
        self.block_pool.free_blocks(freed)

    def pop_blocks_for_free(self, request_id: str) -> list:
        """Every way vLLM drops a request's blocks comes through here: ``free`` (finish, abort, preemption) and,
        with a KV connector under async scheduling, the scheduler's deferred-free path, which pops the blocks
        now and returns them to the pool once the in-flight step is done (``free`` never runs there). Host slots
        are released now either way: the worker runs steps in order, so a later step's spill into a released
        slot lands after every earlier step has read it."""
        ENGINE.release(request_id)
        return super().pop_blocks_for_free(request_id)


def register() -> None:
    """Map the spec to its manager (EngineCore; called by the scheduler-side connector before managers exist)."""
    register_kv_spec(SentenceKVSpec, SentenceKVManager, FullAttentionSpec)


def offload_spec(spec, cfg: SentenceKVConfig):
    """The backend's ``customize_spec`` hook (worker): with ``offload: host`` the full-attention KV groups use the
    SentenceKV spec, hence its manager in EngineCore."""
    if cfg.offload != "host" or type(spec) is not FullAttentionSpec:
        return spec
    return SentenceKVSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init})
