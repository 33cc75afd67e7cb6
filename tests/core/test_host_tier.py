"""#15.6: the host tier's worker side on plain tensors (CPU): spills (the native row copy and the torch fallback),
token reads that move only the host-resident tokens, hot-set remapping of all rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sentencekv_vllm import native
from sentencekv_vllm.integration.kv_layout import BlockLayout
from sentencekv_vllm.integration.tier.host_pool import HostPool, apply_spills
from sentencekv_vllm.integration.tier.host_reads import host_tables, make_resident, read_host_tokens
from sentencekv_vllm.integration.tier.hotset import HotSets
from sentencekv_vllm.integration.tier.messages import Spill
from tests.core.test_kv_layout import BS, HK, D, write_cpu_like

LAYERS, BLOCKS = 2, 8


def caches() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(BLOCKS, HK, BS, 2 * D, generator=gen)
            for i in range(LAYERS)}


@pytest.fixture(params=["native", "torch"])
def copy_path(request, monkeypatch) -> str:
    """Spills through the native row copy (CPU, compiler present) or the torch ``index_copy_`` fallback."""
    if request.param == "torch":
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    elif native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    return request.param


@pytest.mark.parametrize("contiguous", [True, False])
def test_spill_lands_in_host_slots_even_if_the_device_block_is_reused_before_the_read(contiguous, copy_path):
    kv = caches()
    truth = {name: c.clone() for name, c in kv.items()}
    host = HostPool(kv, capacity=4)
    assert (host._copier is not None) == (copy_path == "native")
    host.spill([Spill("a", 0, 5, 2, False), Spill("a", 1, 6, 0, False)])
    for c in kv.values():
        c[5:7] = -1.0                                    # the scheduler gave blocks 5 and 6 to someone else
    for i, name in enumerate(sorted(kv)):
        pool = host.layer(i)
        torch.testing.assert_close(pool[2], truth[name][5].reshape(-1), rtol=0, atol=0)
        torch.testing.assert_close(pool[0], truth[name][6].reshape(-1), rtol=0, atol=0)
    layout = BlockLayout.probe(write_cpu_like, kv[sorted(kv)[1]], BS, HK, D)
    # a hot-set swap-in: head 2 of host slot 2 (device block 5) into head-slice 0 of device block 3
    assert layout.heads_contiguous                      # CPU_ATTN-like: [Hk, block, 2D] per block
    host.load(1, torch.tensor([3 * HK + 0]), torch.tensor([2]), torch.tensor([2]),
              layout.head_offsets(torch.device("cpu")), contiguous)   # row copies, or element offsets
    second = sorted(kv)[1]
    torch.testing.assert_close(kv[second][3, 0], truth[second][5, 2], rtol=0, atol=0)
    torch.testing.assert_close(kv[second][3, 1:], truth[second][3, 1:], rtol=0, atol=0)   # other heads untouched
    assert host.bytes_out == 2 * LAYERS * HK * BS * 2 * D * 4


def test_two_spills_before_a_read_both_land(copy_path):
    kv = caches()
    truth = {name: c.clone() for name, c in kv.items()}
    host = HostPool(kv, capacity=4)
    host.spill([Spill("a", 0, 1, 3, False)])
    host.spill([Spill("b", 0, 2, 1, False)])
    first = sorted(kv)[0]
    torch.testing.assert_close(host.layer(0)[3], truth[first][1].reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(host.layer(0)[1], truth[first][2].reshape(-1), rtol=0, atol=0)


class Req:
    def __init__(self, slot: int) -> None:
        self.slot, self.host_map = slot, {}

    def spilled(self, logical: int, slot: int) -> None:
        self.host_map[logical] = slot


def test_apply_spills_maps_blocks_and_keeps_hot_entries_per_request_slot():
    host = HostPool(caches(), capacity=4)
    reqs = {"a": Req(1)}
    hot = HotSets(LAYERS, 2, torch.device("cpu"))
    apply_spills(host, [Spill("a", 0, 5, 2, True), Spill("a", 1, 6, 3, False), Spill("gone", 0, 7, 0, True)],
                 reqs, lambda req, block, logical: hot.add(req.slot, block, logical))
    assert reqs["a"].host_map == {0: 2, 1: 3}
    assert hot.size(1) == 1 and hot.size(0) == 0
    assert hot.block_ids[1, 0].item() == 5 and hot.holds[:, 1, 0].tolist() == [0] * LAYERS


def _filled(t: int) -> tuple[torch.Tensor, BlockLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
    cache = torch.zeros(BLOCKS, HK, BS, 2 * D)
    layout = BlockLayout.probe(write_cpu_like, cache, BS, HK, D)
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(t, HK, D, generator=gen), torch.randn(t, HK, D, generator=gen)
    table = torch.tensor([[4, 1, 6, 2]])
    write_cpu_like(keys, values, cache, table[0, torch.arange(t) // BS] * BS + torch.arange(t) % BS)
    return cache, layout, table, keys, values


def test_host_tokens_are_read_from_the_host_and_only_they_move():
    t = 4 * BS
    cache, layout, table, keys, values = _filled(t)
    host = HostPool({"model.layers.0.attn": cache}, capacity=3)
    host.spill([Spill("a", 1, 1, 2, False), Spill("a", 2, 6, 0, False)])   # logical blocks 1 and 2 to the host
    cache[1] = 0.0                                                            # their device blocks are reused
    cache[6] = 0.0
    host_table = torch.tensor([[-1, 2, 0, -1]])[:, None, :].expand(1, HK, 4)
    gen = torch.Generator().manual_seed(3)
    pos = torch.randint(0, t, (1, HK, 40), generator=gen)
    ok = torch.rand(1, HK, 40, generator=gen) < 0.9
    moved = []
    gather_tokens = layout.gather_tokens

    def spy(flat, blocks, positions, heads):
        moved.append(positions.numel())
        return gather_tokens(flat, blocks, positions, heads)

    k, v = layout.gather(cache, table, pos)
    layout.gather_tokens = spy
    k, v = read_host_tokens(host, layout, 0, host_table, pos, ok, k, v)
    heads = torch.arange(HK).view(1, HK, 1)
    torch.testing.assert_close(k[ok], keys[pos, heads][ok], rtol=0, atol=0)
    torch.testing.assert_close(v[ok], values[pos, heads][ok], rtol=0, atol=0)
    on_host = ok & (pos // BS >= 1) & (pos // BS <= 2)
    assert moved == [int(on_host.sum())]


def test_make_resident_remaps_each_heads_resident_blocks_for_every_row():
    """Entries are head slices: slot 2's hot block 7 holds logical block 1 in each of its HK slices. Head 0 of
    row 1 selects blocks 1 and 2 (block 2 most), head 1 block 1 only; heads 2+ select nothing on the host."""
    kv = caches()
    host = HostPool(kv, capacity=4)
    layout = BlockLayout.probe(write_cpu_like, kv[sorted(kv)[0]], BS, HK, D)
    hot = HotSets(LAYERS, 3, torch.device("cpu"), HK)
    hot.add(2, 7, 1)
    table = torch.tensor([[0, 3, 4], [5, 1, 2]])
    host_slots = torch.tensor([[-1, 0, -1], [-1, 1, 2]])
    reqs = [SimpleNamespace(host_map={1: 0}), SimpleNamespace(host_map={1: 1, 2: 2})]
    tables = host_tables(reqs, table, HK)
    assert torch.equal(tables.slots, host_slots)
    logical = torch.zeros(2, HK, 3, dtype=torch.long)
    logical[1, 0] = torch.tensor([2, 2, 1])
    logical[1, 1] = torch.tensor([1, 1, 1])
    entries, host_tab = make_resident(host, hot, layout, 0, 1, torch.tensor([0, 2]), tables, logical,
                                      torch.ones_like(logical, dtype=torch.bool))
    own = table[:, None, :] * HK + torch.arange(HK).view(1, HK, 1)
    assert torch.equal(entries[0], own[0]) and torch.equal(host_tab[0], host_slots[0].expand(HK, 3))
    # row 1: head 0 needs blocks 2 (top) and 1, head 1 block 1: HK entries hold (1, h) for every head at first;
    # the slice of a head that selected nothing (head 2) is evicted first for (2, 0)
    assert entries[1, 0, 2].item() == 7 * HK + 2 and host_tab[1, 0, 2].item() == -1
    assert entries[1, 0, 1].item() == 7 * HK + 0 and entries[1, 1, 1].item() == 7 * HK + 1
    assert host_tab[1, 0, 1].item() == host_tab[1, 1, 1].item() == -1
    assert host_tab[1, 2, 1].item() == 1                          # head 2's slice of block 1 went back to the host
    torch.testing.assert_close(kv[sorted(kv)[0]][7, 2], host.layer(0)[2].view(HK, BS, 2 * D)[0], rtol=0, atol=0)


def _tier_world(seed: int):
    """Two rows (request slots 0 and 2) with six logical blocks each, four / three of them on the host, and two /
    one hot blocks; the host slots hold random KV (spilled from spare device blocks)."""
    gen = torch.Generator().manual_seed(seed)
    kv = {f"model.layers.{i}.self_attn.attn": torch.randn(16, HK, BS, 2 * D, generator=gen) for i in range(LAYERS)}
    host = HostPool(kv, capacity=8)
    host.spill([Spill("x", 0, 13 + i % 3, i, False) for i in range(8)])
    for c in kv.values():
        c[13:] = torch.randn(3, HK, BS, 2 * D, generator=gen)
    hot = HotSets(LAYERS, 3, torch.device("cpu"), HK)
    hot.add(0, 10, 3)
    hot.add(0, 11, 4)
    hot.add(2, 12, 3)
    reqs = [SimpleNamespace(host_map={1: 0, 2: 1, 3: 2, 4: 3}), SimpleNamespace(host_map={1: 4, 2: 5, 3: 6})]
    tables = host_tables(reqs, torch.tensor([[0, 9, 9, 9, 9, 1], [2, 9, 9, 9, 3, 4]]), HK)
    layout = BlockLayout.probe(write_cpu_like, kv[sorted(kv)[0]], BS, HK, D)
    return kv, host, hot, tables, layout


def test_native_hot_set_resolution_matches_torch(monkeypatch):
    """Twelve steps of random selections (counts per block, invalid slots, blocks on the device and the host),
    every layer: the native resolution swaps in the same head slices, leaves the same hot-set state and returns
    the same tables and hit / miss / load counts as the torch code."""
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    worlds = {"native": _tier_world(0), "torch": _tier_world(0)}
    counts: dict[str, list] = {"native": [], "torch": []}
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        logical = torch.randint(0, 6, (2, HK, 5), generator=gen)
        valid = torch.rand(2, HK, 5, generator=gen) < 0.8
        out = {}
        for path, (_kv, host, hot, tables, layout) in worlds.items():
            with monkeypatch.context() as m:
                m.setattr("sentencekv_vllm.integration.metrics.observe_hot_set",
                          lambda *a, path=path: counts[path].append(a))
                if path == "torch":
                    m.setattr(native, "usable", lambda *tensors: False)
                out[path] = [make_resident(host, hot, layout, layer, step, torch.tensor([0, 2]), tables,
                                           logical, valid) for layer in range(LAYERS)]
        for (e_n, h_n), (e_t, h_t) in zip(out["native"], out["torch"], strict=True):
            assert torch.equal(e_n, e_t) and torch.equal(h_n, h_t)
        (kv_n, _, hot_n, _, _), (kv_t, _, hot_t, _, _) = worlds["native"], worlds["torch"]
        assert torch.equal(hot_n.holds, hot_t.holds) and torch.equal(hot_n.last, hot_t.last)
        assert all(torch.equal(kv_n[name], kv_t[name]) for name in kv_n)
    assert counts["native"] == counts["torch"]
    assert sum(c[2] for c in counts["torch"]) > 0            # swap-ins happened


def test_prefault_touches_the_whole_pool_at_start_up(monkeypatch):
    """``host_prefault``: the pool is written page by page when it is built (and only then), before any spill."""
    calls = []
    monkeypatch.setattr(HostPool, "_fault_in", lambda self: calls.append(self))
    HostPool(caches(), capacity=4)
    host = HostPool(caches(), capacity=4, prefault=True)
    assert calls == [host]
    monkeypatch.undo()
    for p in host.pool:
        p.fill_(1.0)
    host._fault_in()
    assert all(int(p.count_nonzero()) == 0 for p in host.pool)
