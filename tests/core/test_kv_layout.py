"""The block-layout probe and gather, against hand-written layouts (CPU_ATTN-like transposed K, token-major V)."""

import pytest
import torch

from sentencekv_vllm.integration.kv_layout import BlockLayout

HK, BS, D = 3, 32, 16


def write_cpu_like(key, value, cache, slots):
    """K transposed per (block, head) ([D, block]), V token-major, both in a [N, Hk, block, 2D] cache."""
    n = cache.shape[0]
    view = cache.view(n, HK, 2, BS * D)
    for i, slot in enumerate(slots.tolist()):
        b, t = divmod(slot, BS)
        for h in range(HK):
            view[b, h, 0].view(D, BS)[:, t] = key[i, h]
            view[b, h, 1].view(BS, D)[t] = value[i, h]


def write_scrambled(key, value, cache, slots):
    """A non-affine layout: a fixed permutation of the head dim."""
    perm = torch.tensor([(5 * d + 3) % D for d in range(D)])
    write_cpu_like(key[..., perm], value[..., perm], cache, slots)


@pytest.mark.parametrize("write", [write_cpu_like, write_scrambled])
def test_probe_and_gather_roundtrip(write):
    n_blocks = 6
    cache = torch.zeros(n_blocks, HK, BS, 2 * D, dtype=torch.bfloat16)
    layout = BlockLayout.probe(write, cache, BS, HK, D)
    assert (layout._k_stride is not None) == (write is write_cpu_like)
    gen = torch.Generator().manual_seed(0)
    t = 4 * BS
    keys = torch.randn(t, HK, D, generator=gen).bfloat16()
    values = torch.randn(t, HK, D, generator=gen).bfloat16()
    block_table = torch.tensor([[3, 0, 5, 1]])
    slots = (block_table[0, torch.arange(t) // BS] * BS + torch.arange(t) % BS)
    write(keys, values, cache, slots)
    pos = torch.randint(0, t, (1, HK, 50), generator=gen)
    k, v = layout.gather(cache, block_table, pos)
    heads = torch.arange(HK).view(1, HK, 1)
    torch.testing.assert_close(k, keys[pos, heads], rtol=0, atol=0)
    torch.testing.assert_close(v, values[pos, heads], rtol=0, atol=0)


def test_gather_per_query_head_reads_each_heads_kv_head():
    """Query heads 2h and 2h+1 share KV head h (GQA, adjacent): each gets its own positions from its KV head."""
    cache = torch.zeros(4, HK, BS, 2 * D)
    layout = BlockLayout.probe(write_cpu_like, cache, BS, HK, D)
    gen = torch.Generator().manual_seed(1)
    t = 2 * BS
    keys, values = torch.randn(t, HK, D, generator=gen), torch.randn(t, HK, D, generator=gen)
    block_table = torch.tensor([[2, 0]])
    write_cpu_like(keys, values, cache, block_table[0, torch.arange(t) // BS] * BS + torch.arange(t) % BS)
    pos = torch.randint(0, t, (1, 2 * HK, 7), generator=gen)
    k, v = layout.gather_query_heads(cache, block_table, pos, HK)
    kv_head = (torch.arange(2 * HK) // 2).view(1, -1, 1)
    torch.testing.assert_close(k, keys[pos, kv_head], rtol=0, atol=0)
    torch.testing.assert_close(v, values[pos, kv_head], rtol=0, atol=0)
