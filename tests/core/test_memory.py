"""#15.5: the sentence index's start-up reservation and the host tier's default size (arithmetic only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.core.index import index_dtype
from sentencekv_vllm.integration import memory

DIMS = (32, 8, 32, 128)                  # Llama-3.1-8B: layers, KV heads, query heads, head dim
KV_TOKEN = 2 * 32 * 8 * 128 * 2          # bf16 K and V of one token, every layer


def test_unit_bytes_count_every_pool_slot():
    sent = memory.unit_bytes(SentenceKVConfig(), 32, 8, 128)
    quest = memory.unit_bytes(SentenceKVConfig(policy="quest"), 32, 8, 128)
    assert sent == 32 * 8 * (128 * 4 + 1)
    assert quest == 32 * 8 * (2 * 128 * 4 + 1)          # key_min and key_max
    assert memory.unit_bytes(SentenceKVConfig(), 32, 8, 128, feature_bytes=2) == 32 * 8 * (128 * 2 + 1)


def test_index_is_kept_in_a_16_bit_model_dtype():
    """The features are means of the cached keys: a bf16 / fp16 model's index takes its dtype (half the bytes
    per layer to score); anything else (float32) keeps float32."""
    assert index_dtype(torch.bfloat16) is torch.bfloat16
    assert index_dtype(torch.float16) is torch.float16
    assert index_dtype(torch.float32) is torch.float32


def test_reservation_fits_the_pool_it_leaves():
    """The KV left after the reservation holds d tokens; the reserved units cover d device + the host tokens."""
    cfg = SentenceKVConfig(budget=1024)
    available, host_tokens, seqs = 40 * 2**30, 50_000, 64
    reserved, units = memory.reservation(cfg, available, DIMS, KV_TOKEN, 2, host_tokens, seqs)
    device_tokens = (available - reserved) // KV_TOKEN
    assert units >= memory.index_capacity(cfg, device_tokens + host_tokens, seqs)
    assert units <= memory.index_capacity(cfg, device_tokens + host_tokens + 1, seqs) + 1
    # at 16 tokens per unit the index is about 1/17 of the memory (a centroid ~ one bf16 token's K + V), plus the
    # host tokens' units and the step workspace
    assert 0.05 < reserved / available < 0.08


def test_reservation_shrinks_with_longer_units_and_never_exceeds_the_memory():
    small = memory.reservation(SentenceKVConfig(index_tokens_per_unit=64), 2**30, DIMS, KV_TOKEN, 2, 0, 8)[0]
    large = memory.reservation(SentenceKVConfig(index_tokens_per_unit=8), 2**30, DIMS, KV_TOKEN, 2, 0, 8)[0]
    assert small < large
    assert memory.reservation(SentenceKVConfig(), 10, DIMS, KV_TOKEN, 2, 10**6, 8)[0] == 10


def test_quest_units_are_pages():
    cfg = SentenceKVConfig(policy="quest", quest_page_size=32, index_tokens_per_unit=4)
    assert memory.index_capacity(cfg, 3200, 2) == 100 + 4


def _vllm_config(max_seqs: int = 4, max_len: int = 1000, kv_bytes: int | None = None, extra: dict | None = None):
    model = SimpleNamespace(dtype=torch.bfloat16, max_model_len=max_len, get_num_layers=lambda pc: 2,
                            get_num_kv_heads=lambda pc: 1, get_num_attention_heads=lambda pc: 2,
                            get_head_size=lambda: 8)
    return SimpleNamespace(model_config=model, parallel_config=None,
                           scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
                           cache_config=SimpleNamespace(kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=0.9),
                           kv_transfer_config=SimpleNamespace(kv_connector_extra_config={} if extra is None else extra))


def test_auto_host_pool_is_capped_by_the_model():
    """A tiny model's whole contexts need far less than half the RAM: the cap is theirs."""
    vc = _vllm_config()
    token = 2 * 2 * 1 * 8 * 2
    assert memory.auto_host_pool_bytes(vc, cpu=False) == max(2**28, 4 * 1000 * token)


def test_auto_host_pool_follows_free_ram(monkeypatch):
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=20 * 2**30,
                                                                                  total=32 * 2**30))
    vc = _vllm_config(max_seqs=1024, max_len=10**7, kv_bytes=8 * 2**30)
    assert memory.auto_host_pool_bytes(vc, cpu=False) == 10 * 2**30
    assert memory.auto_host_pool_bytes(vc, cpu=True) == 6 * 2**30      # the CPU KV cache comes from the same RAM


@pytest.mark.parametrize("gib", [None, 0.5])
def test_host_pool_is_resolved_once_and_read_by_every_role(gib):
    cfg = SentenceKVConfig(offload="host", host_pool_gib=gib)
    extra: dict = {}
    vc = _vllm_config(extra=extra)
    memory.resolve_host_pool(cfg, vc, extra, cpu=False)
    first = extra[memory.HOST_POOL_KEY]
    assert first == (2**29 if gib else memory.auto_host_pool_bytes(vc, cpu=False))
    memory.resolve_host_pool(cfg, vc, extra, cpu=True)          # EngineCore's second pass keeps the API server's
    assert extra[memory.HOST_POOL_KEY] == first == memory.host_pool_bytes(cfg, vc)
    assert memory.host_pool_bytes(SentenceKVConfig(), vc) == 0
