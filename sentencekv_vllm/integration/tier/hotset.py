"""Device hot set of the host tier: a few of a request's own device blocks that cache host blocks, per layer.

Why: with ``offload: host`` a request's middle blocks live on the host, and reading every selected token from the
host at every step costs host->device bandwidth (PCIe on a GPU). Consecutive decode steps select mostly the same
sentences, so the previous steps' selection is the prefetch hint: what it used stays resident and the next step
only swaps in what changed. The hot blocks are ordinary blocks of vLLM's pool that the scheduler-side manager did
not free (``tiers.EngineTier.keep_on_device``), so the scheduler counts them like any other block.

The unit of residency is one KV head's slice of a block (an *entry*), not the whole block: each KV head selects
its own blocks, so a request's ``Hk`` heads together touch up to ``Hk`` times the blocks one head attends, and a
hot set counted in whole blocks would have to be ``Hk`` times larger to hold them. A hot device block ``p`` offers
``Hk`` entries, addressed as ``p * Hk + s`` -- the index of that slice in the head-split view of the cache, where
the paged path reads every (row, KV head) as a sequence of its own. An entry holds a *key* ``b * Hk + h``: head
``h`` of logical block ``b``.

Policy, per layer (selection differs per layer) and request, with ``H`` entries:

* the step's selected host keys are ranked by how many selected tokens they hold; the top ``H`` should be
  resident, since they serve the most tokens from the device;
* a top-``H`` key already resident is a hit and stays; a top-``H`` miss is copied (that head's K and V) into an
  entry holding none of the top ``H`` -- first one this step does not use at all, then the least recently used;
* selected keys outside the top ``H`` that are not resident are read token-wise from the host for this step
  (exact path; slower, never wrong). The paged path runs only when every row's entries can hold its selection.

Consecutive steps rank mostly the same keys on top, so after the first steps few slices move.
Initially each hot block holds its own logical block (the prompt blocks nearest the end, kept at spill time).

Every request's hot set lives in one pooled tensor per field, a row per request slot, so a layer resolves all of
a step's rows at once (a handful of tensor ops and one host sync, whatever the batch), not a loop over requests.
"""

from __future__ import annotations

from typing import Callable

import torch

# (entries ``p * Hk + s``, row of each, keys ``b * Hk + h``) -> copy those heads of those blocks from the host
LoadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
_NEVER = torch.iinfo(torch.long).max


class HotSets:
    """Hot sets of every request, one row per request slot: ``block_ids`` ``[rows, H]`` entries ``p * Hk + s``
    (-1: none), ``holds`` / ``last`` ``[L, rows, H]`` (key held per layer, -1 none; step of last use)."""

    def __init__(self, num_layers: int, rows: int, device: torch.device, num_kv_heads: int = 1) -> None:
        self.heads = num_kv_heads
        self.block_ids = torch.full((rows, 0), -1, dtype=torch.long, device=device)
        self.holds = torch.full((num_layers, rows, 0), -1, dtype=torch.long, device=device)
        self.last = torch.full((num_layers, rows, 0), -1, dtype=torch.long, device=device)
        self.count = [0] * rows

    def size(self, row: int) -> int:
        """Entries (head slices) of row ``row``'s hot set."""
        return self.count[row] if row < len(self.count) else 0

    def add(self, row: int, block_id: int, logical: int) -> None:
        """A kept device block joins row ``row``'s hot set: ``Hk`` entries, each holding its own head of its own
        logical block in every layer."""
        hk = self.heads
        self._fit(row + 1, self.size(row) + hk)
        n = self.count[row]
        heads = torch.arange(hk, device=self.block_ids.device)
        self.block_ids[row, n:n + hk] = block_id * hk + heads
        self.holds[:, row, n:n + hk] = logical * hk + heads
        self.last[:, row, n:n + hk] = -1
        self.count[row] = n + hk

    def clear(self, row: int) -> None:
        """The request in slot ``row`` is gone: its hot blocks went back to vLLM with its other blocks."""
        if row < len(self.count):
            self.block_ids[row] = -1
            self.holds[:, row] = -1
            self.count[row] = 0

    def _fit(self, rows: int, width: int) -> None:
        """Grow (between steps: spills are applied before the forward) to at least ``rows`` x ``width``."""
        old_rows, old_width = self.block_ids.shape
        if rows <= old_rows and width <= old_width:
            return
        rows, width = max(rows, old_rows), max(width, old_width + 4 * self.heads)
        pad = (0, width - old_width, 0, rows - old_rows)
        self.block_ids = torch.nn.functional.pad(self.block_ids, pad, value=-1)
        self.holds = torch.nn.functional.pad(self.holds, pad, value=-1)
        self.last = torch.nn.functional.pad(self.last, pad, value=-1)
        self.count += [0] * (rows - old_rows)

    def resolve(self, layer: int, rows: torch.Tensor, logical: torch.Tensor, on_host: torch.Tensor,
                num_blocks: int, step: int, load: LoadFn) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """Make the step's host keys resident where room allows, for every row at once.

        ``logical`` ``[R, N]`` the keys (``b * Hk + h``, below ``num_blocks``) each row selected (``on_host``:
        those living on the host, each counted once per selected token), ``rows`` the rows' request slots. Returns
        ``(held, ids)`` ``[R, H]``: the key each entry holds after the swap-in (-1: none) and the entry itself
        (``p * Hk + s``), then the hits (distinct selected host keys resident before the swap-in), misses and
        entries loaded.
        """
        r = rows.numel()
        width = self.block_ids.shape[1]
        if width == 0 or r == 0:
            empty = torch.full((r, 0), -1, dtype=torch.long, device=logical.device)
            return empty, empty, 0, 0, 0
        ids = self.block_ids.index_select(0, rows)
        holds = self.holds[layer].index_select(0, rows)
        last = self.last[layer].index_select(0, rows)
        entry = ids >= 0
        count = _scatter_count(logical, on_host, num_blocks)                         # [R, M] tokens per block
        needed = count > 0
        held = _mark(holds, entry, num_blocks)                                       # [R, M] resident before
        has_hot = entry.any(1, keepdim=True)          # rows without a hot set read everything from the host
        hits, n_needed = int((needed & held).sum()), int((needed & has_hot).sum())
        last = torch.where(entry & needed.gather(1, holds.clamp(min=0)), step, last)
        top, in_top = _top_blocks(count, entry.sum(1), min(width, num_blocks))     # [R, K] most selected
        miss = in_top & ~held.gather(1, top)
        holds_top = entry & _mark(top, in_top, num_blocks).gather(1, holds.clamp(min=0))
        victims = torch.where(entry & ~holds_top, last, _NEVER).argsort(dim=1, stable=True)   # unused, then LRU
        miss_row, miss_pos = miss.nonzero(as_tuple=True)
        if miss_row.numel():
            rank = (miss.cumsum(1) - 1)[miss_row, miss_pos]
            victim = victims[miss_row, rank]
            blocks = top[miss_row, miss_pos]
            load(ids[miss_row, victim], miss_row, blocks)
            holds[miss_row, victim] = blocks
            last[miss_row, victim] = step
        self.holds[layer].index_copy_(0, rows, holds)
        self.last[layer].index_copy_(0, rows, last)
        return holds.masked_fill(~entry, -1), ids, hits, n_needed - hits, int(miss_row.numel())


def _scatter_count(logical: torch.Tensor, mask: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[R, num_blocks]`` how many of each row's ``logical`` entries (where ``mask``) name each block."""
    out = torch.zeros(logical.shape[0], num_blocks + 1, dtype=torch.long, device=logical.device)
    out.scatter_add_(1, torch.where(mask, logical, num_blocks), torch.ones_like(logical))
    return out[:, :num_blocks]


def _mark(blocks: torch.Tensor, mask: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[R, num_blocks]`` bool: the block appears in the row's ``blocks`` (where ``mask``)."""
    out = torch.zeros(blocks.shape[0], num_blocks + 1, dtype=torch.bool, device=blocks.device)
    out.scatter_(1, torch.where(mask & (blocks >= 0), blocks, num_blocks), True)
    return out[:, :num_blocks]


def _top_blocks(count: torch.Tensor, sizes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most selected blocks (ties: lower block first) and which of them count: selected at all,
    and among the row's first ``sizes`` (its hot-set size)."""
    m = count.shape[1]
    key = torch.where(count > 0, count * (m + 1) + (m - torch.arange(m, device=count.device)), -1)
    value, top = key.topk(k, dim=1)
    in_top = (value >= 0) & (torch.arange(k, device=count.device) < sizes[:, None])
    return top, in_top
