"""Host-tier slot bookkeeping on the scheduler side, driven through vLLM's own ``KVCacheManager`` (real block pool,
real coordinator, the registry mapping ``SentenceKVSpec`` to ``SentenceKVManager``), as vLLM's scheduler calls it.

* Issue #13 item 3: a request finishing or preempted inside one ``schedule()`` after its manager queued a spill
  must not hand that spill's host slot to the next spill of the same step.
* Issue #15 item 4: with a KV connector under async scheduling the scheduler frees a request's blocks through
  ``pop_blocks_for_free`` (deferred free) and ``free`` never runs; host slots must be released anyway.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sentencekv_vllm.config import SentenceKVConfig

BLOCK = 32
PROMPT = 640            # 20 blocks; budget 128 -> blocks 1..17 leave the device once prefill is done


@pytest.fixture()
def manager():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from sentencekv_vllm.integration.tier import kv_spec
    from sentencekv_vllm.integration.tier.kv_spec import SentenceKVManager, SentenceKVSpec
    from sentencekv_vllm.integration.tier.scheduler import ENGINE

    kv_spec.register()
    spec = SentenceKVSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    config = KVCacheConfig(num_blocks=200, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    mgr = KVCacheManager(config, max_model_len=4096, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                         enable_caching=False)
    assert isinstance(mgr.coordinator.single_type_managers[0], SentenceKVManager)
    ENGINE.configure(SentenceKVConfig(budget=128, hot_set_factor=0.0), host_capacity=40, block_size=BLOCK)
    return mgr


def engine():
    from sentencekv_vllm.integration.tier.scheduler import ENGINE

    return ENGINE


def prefilled(mgr, req_id: str, prompt: int = PROMPT):
    """A request whose prefill the scheduler has just finished (what ``update_from_output`` leaves behind)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    req = Request(req_id, list(range(prompt)), SamplingParams(max_tokens=16), None)
    engine().on_request(req_id, None, req.num_tokens)
    assert mgr.allocate_slots(req, prompt) is not None
    req.num_computed_tokens = prompt
    return req


def spill(mgr, req) -> None:
    """The scheduler's per-step (or connector-finished) call; the manager takes host slots and queues copies."""
    mgr.remove_skipped_blocks(req.request_id, req.num_computed_tokens, req.num_prompt_tokens)


def shipped_slots(spills) -> list[int]:
    return [slot for *_, slot, _ in spills]


def assert_no_slot_twice(spills) -> None:
    dup = [s for s, n in Counter(shipped_slots(spills)).items() if n > 1]
    assert not dup, f"host slots {dup} are the target of two spills in one step"


def test_finish_after_queued_spill_does_not_hand_its_slot_to_the_next_spill(manager):
    a, b = prefilled(manager, "a"), prefilled(manager, "b")
    # one schedule(): a finishes -> the connector-finished path calls remove_skipped_blocks (queues a's spill),
    # request_finished -> forget, then free; b's spill follows in the same step
    spill(manager, a)
    engine().forget("a")
    manager.free(a)
    spill(manager, b)
    spills = engine().take_pending()
    assert_no_slot_twice(spills)
    assert {s.req_id for s in spills} == {"b"}, "a finished request's spills must not be shipped"
    assert engine().check(full=True) == []
    assert engine().host_used == len(spills)


def test_preemption_after_queued_spill_does_not_hand_its_slot_to_the_next_spill(manager):
    a, b = prefilled(manager, "a"), prefilled(manager, "b")
    spill(manager, a)
    manager.free(a)                # preempted inside the same schedule(): still known to the tier
    spill(manager, b)
    spills = engine().take_pending()
    assert_no_slot_twice(spills)
    assert engine().check(full=True) == []


def test_shipped_slots_are_reused_only_after_release(manager):
    a = prefilled(manager, "a")
    spill(manager, a)
    first = engine().take_pending()
    b = prefilled(manager, "b")
    spill(manager, b)
    second = engine().take_pending()
    assert not set(shipped_slots(first)) & set(shipped_slots(second)), "a held slot was handed out again"
    manager.free(a)
    c = prefilled(manager, "c")
    spill(manager, c)
    third = engine().take_pending()
    assert "a" not in engine().holdings and set(shipped_slots(third)) <= set(shipped_slots(first))
    assert engine().check(full=True) == []


def test_deferred_free_path_releases_host_slots(manager):
    """Issue #15 item 4: ``Scheduler._free_request_blocks`` with ``defer_block_free`` calls
    ``kv_cache_manager.pop_blocks_for_free`` now and ``block_pool.free_blocks`` once the in-flight step is done."""
    a = prefilled(manager, "a")
    spill(manager, a)
    engine().take_pending()
    b = prefilled(manager, "b")
    spill(manager, b)                              # queued, not shipped yet
    assert engine().host_used > 0
    free_before = manager.block_pool.get_num_free_blocks()
    deferred = [manager.pop_blocks_for_free(r) for r in (a, b)]
    assert engine().host_used == 0, "host slots leak on the deferred-free path"
    assert engine().holdings == {}
    assert engine().take_pending() == []
    assert manager.block_pool.get_num_free_blocks() == free_before, "device blocks must wait for the fence"
    for blocks in deferred:
        manager.block_pool.free_blocks(reversed(blocks))
    assert manager.block_pool.get_num_free_blocks() == manager.block_pool.num_gpu_blocks - 1  # null block
    assert engine().check(full=True) == []


def test_host_tier_full_keeps_blocks_resident_and_invariant_holds(manager):
    engine().configure(SentenceKVConfig(budget=128, hot_set_factor=0.0), host_capacity=5, block_size=BLOCK)
    a, b = prefilled(manager, "a"), prefilled(manager, "b")
    spill(manager, a)
    spill(manager, b)
    spills = engine().take_pending()
    assert len(spills) == 5 and engine().host_used == 5
    assert_no_slot_twice(spills)
    assert engine().check(full=True) == []


def test_check_reports_a_slot_both_free_and_pending(manager):
    """The checker itself is not vacuous: corrupt the state the way the old ``release`` did."""
    a = prefilled(manager, "a")
    spill(manager, a)
    holding = engine().holdings["a"]
    engine().free_slots.append(holding.slots[0])       # free while a's unshipped spill still targets it
    problems = engine().check(full=True)
    assert problems and engine().violations == len(problems)


def test_random_schedules_keep_the_slot_invariant(manager):
    """Random interleavings of spills, finishes, preemptions, deferred frees and shipping, checked every step."""
    rng = random.Random(13)
    engine().configure(SentenceKVConfig(budget=128, hot_set_factor=0.5), host_capacity=30, block_size=BLOCK)
    live: dict[str, object] = {}
    held_by: dict[int, str] = {}
    n = 0
    for _step in range(300):
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.4 and len(live) < 5:
                n += 1
                try:
                    live[f"r{n}"] = prefilled(manager, f"r{n}", rng.choice([200, 320, 640, 700]))
                except AssertionError:
                    pass                     # device pool full this step
            elif op < 0.7 and live:
                spill(manager, live[rng.choice(sorted(live))])
            elif live:
                rid = rng.choice(sorted(live))
                req = live.pop(rid)
                if rng.random() < 0.5:
                    engine().forget(rid)                         # finish / abort
                if rng.random() < 0.5:
                    manager.free(req)
                else:                                            # deferred free, fence passes later
                    manager.block_pool.free_blocks(reversed(manager.pop_blocks_for_free(req)))
                for slot in [s for s, r in held_by.items() if r == rid]:
                    del held_by[slot]
        spills = engine().take_pending()
        assert_no_slot_twice(spills)
        for req_id, _, _, slot, _ in spills:
            assert held_by.get(slot) in (None,), f"slot {slot} shipped to {req_id} while {held_by[slot]} holds it"
            held_by[slot] = req_id
        assert engine().check(full=True) == []
    assert engine().violations == 0
