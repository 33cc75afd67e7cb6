"""Device hot set of the host tier: a few of a request's own device blocks that cache host blocks, per layer.

Why: with ``offload: host`` a request's middle blocks live on the host, and reading every selected token from the
host at every step costs host->device bandwidth (PCIe on a GPU). Consecutive decode steps select mostly the same
sentences, so the previous steps' selection is the prefetch hint: the blocks it used stay resident and the next
step only swaps in what changed. The hot blocks are ordinary blocks of vLLM's pool that the scheduler-side manager
did not free (``tiers.EngineTier.keep_on_device``), so the scheduler counts them like any other block.

Policy, per layer (selection differs per layer) and request:

* a selected block that lives on the host and is resident in this layer's hot set is a hit;
* a miss is copied whole (K and V of every head) into the least-recently-used hot block not used by this step,
  blocks with more selected tokens first;
* when every hot block is already used by this step, the remaining misses are read token-wise from the host for
  this step only (slower, never wrong).

Initially each hot block holds its own logical block (the prompt blocks nearest the end, kept at spill time).
"""

from __future__ import annotations

from typing import Callable

import torch

LoadFn = Callable[[torch.Tensor, torch.Tensor], None]     # (device block ids, logical blocks) -> copy from host


class HotSet:
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

    def resolve(self, layer: int, needed: torch.Tensor, step: int, load: LoadFn) -> tuple[torch.Tensor,
                                                                                        torch.Tensor, int, int]:
        """Make the step's host blocks resident where room allows.

        ``needed``: distinct host-tier logical blocks this layer selected, most-selected first. Returns the logical
        blocks resident after the swap-in with their device block ids, and the hits and loaded-block counts.
        """
        holds, last = self.holds[layer], self.last[layer]
        hit = torch.isin(needed, holds)
        last[torch.isin(holds, needed)] = step
        misses = needed[~hit]
        loaded = 0
        if misses.numel():
            free = torch.nonzero(last < step).flatten()
            victims = free[last[free].argsort(stable=True)][:misses.numel()]
            loaded = victims.numel()
            if loaded:
                load(self.block_ids[victims], misses[:loaded])
                holds[victims] = misses[:loaded]
                last[victims] = step
        resident = holds >= 0
        return holds[resident], self.block_ids[resident], int(hit.sum()), loaded
