"""Extension point: the attention backend on CUDA (FlashAttention underneath). Same split as ``cpu_backend``.

Written against vLLM 0.32's ``FlashAttentionBackend``; not exercised in CI (no GPU there). Dense rows go through
``flash_attn_varlen_func`` via the stock impl with sub-batch metadata (``scheduler_metadata=None`` lets FA plan
the sub-batch itself); sparse rows use the same gather + exact softmax as on CPU.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from sentencekv_vllm.integration.impl import SentenceKVImplMixin, offload_spec, with_plan
from sentencekv_vllm.integration.planner import plan_step
from sentencekv_vllm.integration.state import STATE


class SentenceKVFlashBackend(FlashAttentionBackend):
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
    def get_impl_cls() -> type["SentenceKVFlashImpl"]:
        return SentenceKVFlashImpl

    @staticmethod
    def get_builder_cls() -> type["SentenceKVFlashBuilder"]:
        return SentenceKVFlashBuilder


class SentenceKVFlashBuilder(FlashAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        # cascade attention shares a prefix across rows, which sparse rows break
        base = super().build(0, common_attn_metadata, fast_build)
        plan = plan_step(self, common_attn_metadata, base) if STATE.runner is not None else None
        return with_plan(base, plan)

    def subset_metadata(self, base, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, num_tokens: int):
        return dataclasses.replace(
            base, num_actual_tokens=num_tokens, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_table=block_table, max_seq_len=int(seq_lens.max()),
            max_query_len=int((query_start_loc[1:] - query_start_loc[:-1]).max()), scheduler_metadata=None,
            max_num_splits=0)


class SentenceKVFlashImpl(SentenceKVImplMixin, FlashAttentionImpl):
    pass
