"""The policy registry (``sentencekv_vllm/policies``) is what config, platform validation, the worker's pools and
the eval harness read; and a unit's features built at decode (running statistics, closed) equal the ones the
prefill build gives the same tokens."""

from __future__ import annotations

import pytest
import torch

from sentencekv_vllm import policies
from sentencekv_vllm.config import POLICIES, SentenceKVConfig, SentenceKVConfigError, resolve_request
from sentencekv_vllm.eval import engines


def test_config_and_eval_read_the_registry():
    assert POLICIES == policies.names() and POLICIES[0] == SentenceKVConfig().policy
    assert engines.POLICIES[0] == "full" and set(engines.POLICIES) == set(policies.names())
    assert {p: engines.server_group(p) for p in engines.POLICIES} == {
        "full": "full", "sentencekv": "sentencekv", "streaming": "sentencekv", "snapkv": "sentencekv",
        "reference": "sentencekv",
        "quest": "quest"}


@pytest.mark.parametrize("server,request_policy,ok", [
    ("sentencekv", "snapkv", True), ("snapkv", "sentencekv", True), ("streaming", "full", True),
    ("sentencekv", "quest", False), ("quest", "snapkv", False), ("quest", "quest", True)])
def test_per_request_policy_needs_the_servers_units(server, request_policy, ok):
    cfg = SentenceKVConfig(policy=server)
    args = {"sentencekv_policy": request_policy}
    if ok:
        resolve_request(cfg, args, max_model_len=8192)
    else:
        with pytest.raises(SentenceKVConfigError, match="different index units"):
            resolve_request(cfg, args, max_model_len=8192)


def test_pool_slots_follow_the_units():
    assert policies.pool_slots("sentences") == (("centroid",), ("key_sum",))
    assert policies.pool_slots("pages") == (("key_min", "key_max"), ("key_min", "key_max"))


@pytest.mark.parametrize("name", ["sentencekv", "quest"])
def test_unit_closed_at_decode_equals_prefill_build(name):
    """Feeding a unit's keys one token at a time (``update_open``) and closing it (``close_open``) gives the
    features ``build_units`` computes for the same span (centroid over all keys; page min / max)."""
    policy = policies.get(name)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 3, 8, generator=gen)
    open_rows = {s: torch.zeros(1, 3, 8) for s in policy.open_slots}
    for t in range(7):
        open_rows = policy.update_open(open_rows, keys[t:t + 1], torch.tensor([t == 0]))
    closed = policy.close_open(open_rows, torch.tensor([7.0]))
    built, valid = policy.build_units(keys, torch.tensor([[0, 7]]), None, SentenceKVConfig())
    assert valid.all() and set(closed) == set(built) == set(policy.slots)
    for slot in policy.slots:
        torch.testing.assert_close(closed[slot][0], built[slot][0])


@pytest.mark.parametrize("name", ["sentencekv", "quest"])
def test_engine_fold_equals_policy_reference(name):
    """The worker's in-place fold (``UnitStore.reset_open`` once per step, ``fold_open`` per layer, two requests
    interleaved, one starting a new unit mid-way) gives the statistics of ``Policy.update_open``, every layer."""
    from sentencekv_vllm.integration.state import UnitStore

    policy = policies.get(name)
    store = UnitStore(num_layers=2, num_kv_heads=3, num_heads=6, head_dim=8, max_reqs=4, device=torch.device("cpu"),
                      unit_slots=policy.slots, open_slots=dict(policy.open_slots))
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor([2, 0])
    ref = {s: torch.zeros(2, 3, 8) for s in policy.open_slots}
    for t in range(6):
        keys = torch.randn(2, 3, 8, generator=gen)
        reset = torch.tensor([t == 0, t in (0, 3)])
        ref = policy.update_open(ref, keys, reset)
        if reset.any():
            store.reset_open(slots[reset])
        for lyr in range(2):
            store.fold_open(lyr, slots, torch.zeros(2, 3, 8), keys)
    for s in policy.open_slots:
        for lyr in range(2):
            torch.testing.assert_close(store.open[s][lyr, slots], ref[s])


@pytest.mark.parametrize("name", ["sentencekv", "quest"])
def test_catch_up_from_cached_keys_equals_the_fold(name):
    """A decode row that folds only once it nears ``sparse_from`` (``planner.CatchUp``): the sentences it closed
    before, and its open one, reduced from their keys in one ``UnitStore.catch_up`` per layer, get exactly the
    features and open statistics the token-by-token fold gives (same float order), and its query sum restarts."""
    from sentencekv_vllm.integration.state import UnitStore

    policy = policies.get(name)
    dims = dict(num_layers=2, num_kv_heads=3, num_heads=6, head_dim=8, max_reqs=4, device=torch.device("cpu"),
                unit_slots=policy.slots, open_slots=dict(policy.open_slots))
    folded, caught = UnitStore(**dims), UnitStore(**dims)
    spans = [(0, 5), (5, 12), (12, 15)]              # two closed units, then the open one
    keys = torch.randn(2, 15, 3, 8, generator=torch.Generator().manual_seed(2))
    slot, units = 1, torch.tensor([3, 0])
    for j, (lo, hi) in enumerate(spans):
        folded.reset_open(torch.tensor([slot]))
        for t in range(lo, hi):
            for lyr in range(2):
                folded.fold_open(lyr, torch.tensor([slot]), torch.ones(1, 3, 8), keys[lyr, t:t + 1])
        if j < 2:
            rows = folded.open_rows(torch.tensor([slot]))
            for s, value in policy.close_open(rows, torch.tensor([float(hi - lo)])).items():
                folded.units[s][:, units[j:j + 1]] = value
    caught.qsum.fill_(7.0)
    for s in caught.open:
        caught.open[s].fill_(3.0)                     # stale statistics of the slot's previous request
    seg = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    for lyr in range(2):
        caught.catch_up(lyr, slot, keys[lyr], seg, units, torch.tensor([5.0, 7.0]), [policy])
    for s in policy.slots:
        assert torch.equal(caught.units[s][:, units], folded.units[s][:, units])
    for s in policy.open_slots:
        assert torch.equal(caught.open[s][:, slot], folded.open[s][:, slot])
    assert torch.equal(caught.qsum[:, slot], torch.zeros(2, 3, 8))
