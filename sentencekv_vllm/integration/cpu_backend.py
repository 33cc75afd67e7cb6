"""Extension point: the attention backend on CPU (CPU_ATTN underneath). Backend / Builder / Impl split.

* Backend: CPU_ATTN's static facts (cache layout, block sizes, dtypes) under the name ``SENTENCEKV``.
* Builder: the stock metadata plus a per-step plan (:mod:`~sentencekv_vllm.integration.planner`), typed as
  :class:`SentenceKVCPUMetadata`.
* Impl: :class:`~sentencekv_vllm.integration.impl.SentenceKVImplMixin` over the stock impl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from sentencekv_vllm.integration.compat import cpu_attention, cpu_scheduler_metadata
from sentencekv_vllm.integration.impl import SentenceKVBackendMixin, SentenceKVBuilderMixin, SentenceKVImplMixin
from sentencekv_vllm.integration.planner import StepPlan


@dataclass
class SentenceKVCPUMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus the step plan every layer's forward reads (None: the stock path)."""

    plan: StepPlan | None = None


class SentenceKVCPUBackend(SentenceKVBackendMixin, CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["SentenceKVCPUImpl"]:
        return SentenceKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type["SentenceKVCPUBuilder"]:
        return SentenceKVCPUBuilder


class SentenceKVCPUBuilder(SentenceKVBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = SentenceKVCPUMetadata
    # CPU_ATTN keeps each (block, KV head) contiguous ([blocks, Hk, block, 2*D]), so [blocks * Hk, 1, block, 2*D]
    # is a valid cache of one KV head per sequence
    supports_paged_sparse = True

    def subset_fields(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      heads: tuple[int, int] | None = None) -> dict:
        # the CPU kernel's work partition depends on seq_lens: reusing the batch's gives wrong attention silently
        return {"scheduler_metadata": cpu_scheduler_metadata(self, len(seq_lens), seq_lens, query_start_loc,
                                                             heads)}


class SentenceKVCPUImpl(SentenceKVImplMixin, CPUAttentionBackendImpl):
    _head_split: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def head_split_attention(self, layer, query, kv_cache, metadata, output) -> None:
        """CPU_ATTN's kernel called directly on this layer's head-split key/value views (built once per cache:
        each layer has its own impl). What the stock ``forward`` would do around the call (views, chunking,
        slicing) costs about as much as the kernel on a short selection."""
        key = (kv_cache.data_ptr(), kv_cache.shape)
        if self._head_split is None or self._head_split[0] != key:
            n, hk, bs, width = kv_cache.shape
            kc, vc = kv_cache.view(n * hk, 1, bs * 2, width // 2).chunk(2, dim=2)
            self._head_split = (key, kc, vc)
        _, kc, vc = self._head_split
        cpu_attention(self, layer, query, kc, vc, output, metadata)
