"""Extension point: the attention backend on CUDA (FlashAttention underneath). Same split as ``cpu_backend``.

Written against vLLM 0.32's ``FlashAttentionBackend``; never run on a GPU (none was available; CPU tests import it
and check its declared capabilities). Dense rows go through ``flash_attn_varlen_func`` via the stock impl with
sub-batch metadata (``scheduler_metadata=None`` lets FA plan the sub-batch itself); sparse rows use the same gather
+ exact softmax as on CPU.

CUDA graphs: attention runs outside them (``AttentionCGSupport.NEVER``), the rest of the model in piecewise graphs.
FlashAttention's builder declares ``ALWAYS`` (FA3) / ``UNIFORM_BATCH`` (FA2), so with vLLM's default
``FULL_AND_PIECEWISE`` a decode-only step would replay a graph captured with an empty plan: SentenceKV's Python
forward (step plan, running sums, sentence selection, indexing of generated sentences) would never run, later mixed
steps would select with stale state, and with the host tier the replayed dense kernel would read freed blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from sentencekv_vllm.integration.impl import SentenceKVBackendMixin, SentenceKVBuilderMixin, SentenceKVImplMixin
from sentencekv_vllm.integration.planner import StepPlan


@dataclass
class SentenceKVFlashMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the step plan every layer's forward reads (None: the stock path)."""

    plan: StepPlan | None = None


class SentenceKVFlashBackend(SentenceKVBackendMixin, FlashAttentionBackend):
    """FlashAttention's static facts (head sizes, dtypes, block sizes, compute capability >= 8.0) under the name
    ``SENTENCEKV``; ``validate_configuration`` is FlashAttention's and runs at backend selection
    (``platform.select_backend``)."""

    @staticmethod
    def get_impl_cls() -> type["SentenceKVFlashImpl"]:
        return SentenceKVFlashImpl

    @staticmethod
    def get_builder_cls() -> type["SentenceKVFlashBuilder"]:
        return SentenceKVFlashBuilder


class SentenceKVFlashBuilder(SentenceKVBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = SentenceKVFlashMetadata
    # vLLM's runner resolves FULL_AND_PIECEWISE -> PIECEWISE for NEVER when attention is a splitting op (the
    # default), and refuses explicit FULL modes (``CompilationConfig.resolve_cudagraph_mode_and_sizes``).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        """NEVER, whatever FlashAttention's override computes from the FA version."""
        return AttentionCGSupport.NEVER

    def prefix_len(self, common_prefix_len: int) -> int:
        return 0    # cascade attention shares a prefix across rows, which sparse rows break

    def subset_fields(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> dict:
        return {"scheduler_metadata": None, "max_num_splits": 0}


class SentenceKVFlashImpl(SentenceKVImplMixin, FlashAttentionImpl):
    pass
