"""Device hot set of the host tier: a few of a request's own device blocks that cache host blocks, per layer.

Why: with ``offload: host`` a request's middle blocks live on the host, and reading every selected token from the
host at every step costs host->device bandwidth (PCIe on a GPU). Consecutive decode steps select mostly the same
sentences, so the previous steps' selection is the prefetch hint: the blocks it used stay resident and the next
step only swaps in what changed. The hot blocks are ordinary blocks of vLLM's pool that the scheduler-side manager
did not free (``tiers.EngineTier.keep_on_device``), so the scheduler counts them like any other block.

Policy, per layer (selection differs per layer) and request, with ``H`` hot blocks:

* the step's selected host blocks are ranked by how many selected tokens they hold; the top ``H`` should be
  resident, since they serve the most tokens from the device;
* a top-``H`` block already resident is a hit and stays; a top-``H`` miss is copied whole (K and V of every head)
  into a hot block holding none of the top ``H`` -- first one this step does not use at all, then the least
  recently used;
* selected blocks outside the top ``H`` that are not resident are read token-wise from the host for this step
  (slower, never wrong).

Consecutive steps rank mostly the same blocks on top, so after the first steps few blocks move.
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
