"""Extension point: the attention backend on CPU (CPU_ATTN underneath). Backend / Builder / Impl split.

* Backend: CPU_ATTN's static facts (cache layout, block sizes, dtypes) under the name ``SENTENCEKV``.
* Builder: the stock metadata plus a per-step plan (:mod:`~sentencekv_vllm.integration.planner`).
* Impl: :class:`~sentencekv_vllm.integration.impl.SentenceKVImplMixin` over the stock impl.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from sentencekv_vllm.integration.compat import cpu_scheduler_metadata
from sentencekv_vllm.integration.impl import SentenceKVImplMixin, offload_spec, with_plan
from sentencekv_vllm.integration.planner import plan_step
from sentencekv_vllm.integration.state import STATE


class SentenceKVCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "SENTENCEKV"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def customize_spec(cls, spec):
        return offload_spec(spec)

    @staticmethod
    def get_impl_cls() -> type["SentenceKVCPUImpl"]:
        return SentenceKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type["SentenceKVCPUBuilder"]:
        return SentenceKVCPUBuilder


class SentenceKVCPUBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = plan_step(self, common_attn_metadata, base) if STATE.runner is not None else None
        return with_plan(base, plan)

    def subset_metadata(self, base, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, num_tokens: int):
        """Stock metadata for a sub-batch of rows; the CPU work partition must be recomputed for it."""
        return dataclasses.replace(
            base, num_actual_tokens=num_tokens, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_table=block_table, max_seq_len=int(seq_lens.max()),
            max_query_len=int((query_start_loc[1:] - query_start_loc[:-1]).max()),
            scheduler_metadata=cpu_scheduler_metadata(self, len(seq_lens), seq_lens, query_start_loc))


class SentenceKVCPUImpl(SentenceKVImplMixin, CPUAttentionBackendImpl):
    pass
