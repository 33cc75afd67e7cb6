"""Hot-set policy (integration/tier/hotset.py): hits, LRU eviction, per-layer residency, overflow. Pure torch."""

from __future__ import annotations

import torch

from sentencekv_vllm.integration.tier.hotset import HotSet


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.calls.append((dst.tolist(), src.tolist()))


def hot_set(blocks: dict[int, int], layers: int = 2) -> HotSet:
    hot = HotSet(layers, torch.device("cpu"))
    for block_id, logical in blocks.items():
        hot.add(block_id, logical)
    return hot


def test_kept_blocks_hit_in_every_layer_without_copies():
    hot = hot_set({100: 7, 101: 8})
    for layer in (0, 1):
        load = Recorder()
        held, ids, hits, loaded = hot.resolve(layer, torch.tensor([8, 7]), step=1, load=load)
        assert (hits, loaded, load.calls) == (2, 0, [])
        assert dict(zip(held.tolist(), ids.tolist(), strict=True)) == {7: 100, 8: 101}


def test_miss_evicts_least_recently_used_and_only_in_that_layer():
    hot = hot_set({100: 7, 101: 8, 102: 9})
    hot.resolve(0, torch.tensor([7]), step=1, load=Recorder())
    hot.resolve(0, torch.tensor([9]), step=2, load=Recorder())
    load = Recorder()
    held, ids, hits, loaded = hot.resolve(0, torch.tensor([3]), step=3, load=load)
    assert (hits, loaded) == (0, 1)
    assert load.calls == [([101], [3])]             # block 8 was never used: least recent
    assert dict(zip(held.tolist(), ids.tolist(), strict=True)) == {7: 100, 3: 101, 9: 102}
    held1, _, _, _ = hot.resolve(1, torch.tensor([8]), step=3, load=Recorder())
    assert 8 in held1.tolist()                       # layer 1 is untouched


def test_most_selected_blocks_take_the_hot_set_and_the_rest_stays_on_host():
    hot = hot_set({100: 1, 101: 2})
    load = Recorder()
    held, _, hits, loaded = hot.resolve(0, torch.tensor([5, 6, 1]), step=1, load=load)   # 5 most selected
    assert (hits, loaded) == (1, 2)
    assert load.calls == [([101, 100], [5, 6])]      # 2 is unused (evicted first); 1 is used but ranks third
    assert sorted(held.tolist()) == [5, 6]           # 1 is read token-wise from the host this step


def test_top_blocks_already_resident_are_not_moved():
    hot = hot_set({100: 1, 101: 2, 102: 3})
    load = Recorder()
    _, _, hits, loaded = hot.resolve(0, torch.tensor([2, 9, 1]), step=1, load=load)
    assert (hits, loaded) == (2, 1)
    assert load.calls == [([102], [9])]              # only the slot holding an unselected block is reused


def test_previous_selection_is_resident_next_step():
    hot = hot_set({100: 1, 101: 2, 102: 3, 103: 4})
    hot.resolve(0, torch.tensor([10, 11]), step=1, load=Recorder())
    load = Recorder()
    _, _, hits, loaded = hot.resolve(0, torch.tensor([11, 10, 12]), step=2, load=load)
    assert (hits, loaded) == (2, 1)
    assert load.calls[0][1] == [12]
