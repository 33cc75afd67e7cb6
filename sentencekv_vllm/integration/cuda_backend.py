"""Extension point: the attention backend on CUDA (FlashAttention underneath). Same split as ``cpu_backend``.

Written against vLLM 0.32's ``FlashAttentionBackend``; not exercised in CI (no GPU there). Dense rows go through
``flash_attn_varlen_func`` via the stock impl with sub-batch metadata (``scheduler_metadata=None`` lets FA plan
the sub-batch itself); sparse rows use the same gather + exact softmax as on CPU.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from sentencekv_vllm.integration.impl import SentenceKVBackendMixin, SentenceKVBuilderMixin, SentenceKVImplMixin


class SentenceKVFlashBackend(SentenceKVBackendMixin, FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["SentenceKVFlashImpl"]:
        return SentenceKVFlashImpl

    @staticmethod
    def get_builder_cls() -> type["SentenceKVFlashBuilder"]:
        return SentenceKVFlashBuilder


class SentenceKVFlashBuilder(SentenceKVBuilderMixin, FlashAttentionMetadataBuilder):
    def prefix_len(self, common_prefix_len: int) -> int:
        return 0    # cascade attention shares a prefix across rows, which sparse rows break

    def subset_fields(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> dict:
        return {"scheduler_metadata": None, "max_num_splits": 0}


class SentenceKVFlashImpl(SentenceKVImplMixin, FlashAttentionImpl):
    pass
