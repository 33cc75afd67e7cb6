"""The block-layout probe and gather, against hand-written layouts (CPU_ATTN-like transposed K, token-major V)."""

import pytest
import torch

from sentencekv_vllm import native
from sentencekv_vllm.integration.kv_layout import BlockLayout

HK, BS, D = 3, 32, 16


@pytest.fixture(params=["native", "torch"])
def key_reader(request, monkeypatch):
    """``range_keys`` through the native gather (CPU, library built) and through torch (elsewhere)."""
    if request.param == "native":
        if not native.usable(torch.zeros(1)):
            pytest.skip("native kernels not built")
    else:
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    return request.param


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
def test_probe_and_gather_roundtrip(write, key_reader):
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
    for lo, hi in ((0, t), (5, 6), (BS - 1, 3 * BS + 2), (2 * BS, 3 * BS)):   # whole blocks read, keys picked
        torch.testing.assert_close(layout.range_keys(cache, block_table[0], lo, hi), keys[lo:hi], rtol=0, atol=0)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_range_keys_reads_cpu_attns_own_layout(dtype, key_reader):
    """The prompt keys the index is built from, read back from a cache vLLM's CPU kernel wrote (bf16 on an AMX
    machine packs keys in pairs: the layout is not affine, the offset table handles it)."""
    ops = pytest.importorskip("vllm._custom_ops")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    d, bs = 64, 32
    isa = _get_attn_isa(dtype, bs, d)
    cache = torch.zeros(7, HK, bs, 2 * d, dtype=dtype)

    def write(key, value, kv_cache, slots):
        n = kv_cache.shape[0]
        kc, vc = kv_cache.view(n, HK, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    layout = BlockLayout.probe(write, cache, bs, HK, d)
    gen = torch.Generator().manual_seed(2)
    t = 4 * bs - 5
    keys = torch.randn(t, HK, d, generator=gen).to(dtype)
    row = torch.tensor([6, 2, 4, 0], dtype=torch.int32)
    write(keys, torch.randn(t, HK, d, generator=gen).to(dtype), cache, (row.long()[:, None] * bs +
                                                                          torch.arange(bs)).flatten()[:t])
    for lo, hi in ((0, t), (40, 41), (bs - 3, 3 * bs + 1)):
        torch.testing.assert_close(layout.range_keys(cache, row, lo, hi), keys[lo:hi], rtol=0, atol=0)
