"""Hot-set policy (integration/tier/hotset.py): hits, LRU eviction, per-layer residency, overflow, and the pooled
(all rows at once) resolution against the per-request one it replaced. Pure torch."""

from __future__ import annotations

import random

import torch

from sentencekv_vllm.integration.tier.hotset import HotSets

NUM_BLOCKS = 64


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
        self.calls.append((dst.tolist(), src.tolist()))


def hot_set(blocks: dict[int, int], layers: int = 2, row: int = 0) -> HotSets:
    hot = HotSets(layers, row + 1, torch.device("cpu"))
    for block_id, logical in blocks.items():
        hot.add(row, block_id, logical)
    return hot


def selection(needed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row selecting ``needed`` (most selected first: block i gets len - i tokens), all on the host."""
    tokens = [b for i, b in enumerate(needed) for _ in range(len(needed) - i)]
    logical = torch.tensor([tokens])
    return logical, torch.ones_like(logical, dtype=torch.bool)


def resolve(hot: HotSets, layer: int, needed: list[int], step: int, load=None):
    """(held {logical: device block}, hits, loaded) of row 0."""
    logical, on_host = selection(needed)
    held, ids, hits, _, loaded = hot.resolve(layer, torch.tensor([0]), logical, on_host, NUM_BLOCKS, step,
                                             load or Recorder())
    pairs = {h: i for h, i in zip(held[0].tolist(), ids[0].tolist(), strict=True) if h >= 0}
    return pairs, hits, loaded


def test_kept_blocks_hit_in_every_layer_without_copies():
    hot = hot_set({100: 7, 101: 8})
    for layer in (0, 1):
        load = Recorder()
        held, hits, loaded = resolve(hot, layer, [8, 7], 1, load)
        assert (hits, loaded, load.calls) == (2, 0, [])
        assert held == {7: 100, 8: 101}


def test_miss_evicts_least_recently_used_and_only_in_that_layer():
    hot = hot_set({100: 7, 101: 8, 102: 9})
    resolve(hot, 0, [7], 1)
    resolve(hot, 0, [9], 2)
    load = Recorder()
    held, hits, loaded = resolve(hot, 0, [3], 3, load)
    assert (hits, loaded) == (0, 1)
    assert load.calls == [([101], [3])]             # block 8 was never used: least recent
    assert held == {7: 100, 3: 101, 9: 102}
    held1, _, _ = resolve(hot, 1, [8], 3)
    assert 8 in held1                                # layer 1 is untouched


def test_most_selected_blocks_take_the_hot_set_and_the_rest_stays_on_host():
    hot = hot_set({100: 1, 101: 2})
    load = Recorder()
    held, hits, loaded = resolve(hot, 0, [5, 6, 1], 1, load)   # 5 most selected
    assert (hits, loaded) == (1, 2)
    assert load.calls == [([101, 100], [5, 6])]      # 2 is unused (evicted first); 1 is used but ranks third
    assert sorted(held) == [5, 6]                    # 1 is read token-wise from the host this step


def test_top_blocks_already_resident_are_not_moved():
    hot = hot_set({100: 1, 101: 2, 102: 3})
    load = Recorder()
    _, hits, loaded = resolve(hot, 0, [2, 9, 1], 1, load)
    assert (hits, loaded) == (2, 1)
    assert load.calls == [([102], [9])]              # only the slot holding an unselected block is reused


def test_previous_selection_is_resident_next_step():
    hot = hot_set({100: 1, 101: 2, 102: 3, 103: 4})
    resolve(hot, 0, [10, 11], 1)
    load = Recorder()
    _, hits, loaded = resolve(hot, 0, [11, 10, 12], 2, load)
    assert (hits, loaded) == (2, 1)
    assert load.calls[0][1] == [12]


def test_cleared_row_holds_nothing_and_is_reused():
    hot = hot_set({100: 1, 101: 2}, row=1)
    hot.clear(1)
    assert hot.size(1) == 0
    hot.add(1, 200, 5)
    logical, on_host = selection([5, 1])
    held, ids, hits, _, loaded = hot.resolve(0, torch.tensor([1]), logical, on_host, NUM_BLOCKS, 1, Recorder())
    assert (hits, loaded) == (1, 0)
    assert {h: i for h, i in zip(held[0].tolist(), ids[0].tolist(), strict=True) if h >= 0} == {5: 200}


def test_pooled_resolution_equals_the_per_request_one():
    """Random steps over rows of different hot-set sizes, some rows absent from a step: every row's held blocks,
    device ids, hits and loads match the per-request hot set's, layer by layer."""
    rng = random.Random(0)
    layers, rows = 3, 5
    pooled = HotSets(layers, 2, torch.device("cpu"))          # grows to 5 rows as blocks are added
    oracles: dict[int, RowHotSet] = {}
    next_block = 1000
    for row in range(rows):
        oracles[row] = RowHotSet(layers, torch.device("cpu"))
        for _ in range(rng.randint(0, 6) if row else 0):        # row 0 never gets a hot set
            logical = rng.randrange(NUM_BLOCKS)
            pooled.add(row, next_block, logical)
            oracles[row].add(next_block, logical)
            next_block += 1
    for step in range(1, 15):
        present = sorted(rng.sample(range(rows), rng.randint(1, rows)))
        for layer in range(layers):
            tokens = [[rng.randrange(NUM_BLOCKS) for _ in range(rng.randint(1, 40))] for _ in present]
            width = max(map(len, tokens))
            logical = torch.zeros(len(present), width, dtype=torch.long)
            on_host = torch.zeros(len(present), width, dtype=torch.bool)
            for j, t in enumerate(tokens):
                logical[j, :len(t)] = torch.tensor(t)
                on_host[j, :len(t)] = torch.rand(len(t)) < 0.8
            loads: list[tuple[int, int, int]] = []

            def load(dst, row, blocks, present=present, loads=loads):
                loads.extend((present[r], d, b) for d, r, b in zip(dst.tolist(), row.tolist(), blocks.tolist(),
                                                                   strict=True))

            held, ids, hits, misses, loaded = pooled.resolve(layer, torch.tensor(present), logical, on_host,
                                                             NUM_BLOCKS, step, load)
            want_hits = want_loaded = want_misses = 0
            want_loads = []
            for j, row in enumerate(present):
                oracle = oracles[row]
                if not len(oracle):
                    continue
                blocks, counts = torch.unique(logical[j][on_host[j]], return_counts=True)
                needed = blocks[counts.argsort(descending=True, stable=True)]

                def record(dst, src, row=row, out=want_loads):
                    out.extend((row, d, b) for d, b in zip(dst.tolist(), src.tolist(), strict=True))

                o_held, o_ids, o_hit, o_loaded = oracle.resolve(layer, needed, step, record)
                got = {h: i for h, i in zip(held[j].tolist(), ids[j].tolist(), strict=True) if h >= 0}
                assert got == dict(zip(o_held.tolist(), o_ids.tolist(), strict=True)), (step, layer, row)
                want_hits, want_loaded = want_hits + o_hit, want_loaded + o_loaded
                want_misses += needed.numel() - o_hit
            assert (hits, loaded, misses) == (want_hits, want_loaded, want_misses)
            assert sorted(loads) == sorted(want_loads)


class RowHotSet:
    """The per-request hot set the pooled one replaced (one request, a Python loop per row): the oracle."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.block_ids = torch.empty(0, dtype=torch.long, device=device)
        self.holds = torch.empty(num_layers, 0, dtype=torch.long, device=device)   # logical block held, -1 none
        self.last = torch.empty(num_layers, 0, dtype=torch.long, device=device)    # step of last use

    def __len__(self) -> int:
        return self.block_ids.numel()

    def add(self, block_id: int, logical: int) -> None:
        """A kept device block joins the hot set, holding its own logical block in every layer."""
        dev = self.block_ids.device
        self.block_ids = torch.cat([self.block_ids, torch.tensor([block_id], device=dev)])
        col = torch.full((self.holds.shape[0], 1), logical, dtype=torch.long, device=dev)
        self.holds = torch.cat([self.holds, col], 1)
        self.last = torch.cat([self.last, torch.full_like(col, -1)], 1)

    def resolve(self, layer: int, needed: torch.Tensor, step: int, load) -> tuple[torch.Tensor,
                                                                                        torch.Tensor, int, int]:
        """Make the step's host blocks resident where room allows.

        ``needed``: distinct host-tier logical blocks this layer selected, most-selected first. Returns the logical
        blocks resident after the swap-in with their device block ids, the hits (needed blocks resident before the
        swap-in) and the number of blocks loaded.
        """
        holds, last = self.holds[layer], self.last[layer]
        hit = torch.isin(needed, holds)
        last[torch.isin(holds, needed)] = step
        top = needed[:len(self)]
        misses = top[~torch.isin(top, holds)]
        loaded = misses.numel()
        if loaded:
            free = torch.nonzero(~torch.isin(holds, top)).flatten()
            victims = free[last[free].argsort(stable=True)][:loaded]     # unused this step first, then LRU
            load(self.block_ids[victims], misses)
            holds[victims] = misses
            last[victims] = step
        resident = holds >= 0
        return holds[resident], self.block_ids[resident], int(hit.sum()), loaded
