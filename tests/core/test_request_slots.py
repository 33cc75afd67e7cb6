"""Worker request-slot pool (integration/state.py): never the reason an engine dies (issue #13 item 4).

The mechanism fix is that preempted requests give their slot back (``compat.on_requests_preempted``, tested end to
end in tests/e2e/test_robustness.py); this pins the second line of defence: should more requests than
``max_num_seqs`` ever hold state, the running-sum rows grow and keep their contents."""

from __future__ import annotations

import torch

from sentencekv_vllm.integration.state import UnitStore


def test_request_slots_grow_instead_of_failing_and_keep_their_sums():
    store = UnitStore(num_layers=2, num_kv_heads=1, num_heads=3, head_dim=4, max_reqs=2,
                      device=torch.device("cpu"), unit_slots=("key_min", "key_max"),
                      open_slots={"key_min": "amin", "key_max": "amax"})
    a, b = store.alloc_slot(), store.alloc_slot()
    store.qsum[:, a] = 1.0
    store.open["key_min"][:, b] = 2.0
    store.open["key_max"][:, b] = 3.0
    c = store.alloc_slot()
    assert len({a, b, c}) == 3 and store.qsum.shape[1] == 4
    assert store.open["key_max"].shape[1] == 4 and store.open["key_min"].shape[1] == 4
    assert bool((store.qsum[:, a] == 1).all()) and bool((store.open["key_min"][:, b] == 2).all())
    assert bool((store.open["key_max"][:, b] == 3).all()) and bool((store.qsum[:, c] == 0).all())
    store.free_slots.append(c)
    assert store.alloc_slot() == c
