"""Models with learned per-head attention sinks (``s_aux``, e.g. gpt-oss) are refused when the attention layer is
built (engine start-up), not served with attention that silently drops the sink term. vLLM's real CPU impl."""

from __future__ import annotations

import pytest
import torch


def _impl(model_path: str, sinks: torch.Tensor | None):
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    from sentencekv_vllm.integration.cpu_backend import SentenceKVCPUImpl

    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(model=model_path))):
        return SentenceKVCPUImpl(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None,
                                 sliding_window=None, kv_cache_dtype="auto", sinks=sinks)


def test_learned_attention_sinks_are_refused_at_start_up(model_path):
    with pytest.raises(ValueError, match="attention sinks"):
        _impl(model_path, torch.zeros(9))


def test_models_without_sinks_build(model_path):
    assert _impl(model_path, None).sinks is None
