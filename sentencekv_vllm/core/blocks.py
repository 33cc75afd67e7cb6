"""Block-granular selection: the best sentences, expressed as the paged-cache blocks that hold them.

The exact path (``selection.select_positions``) attends precisely the chosen tokens, which forces a gather of
every selected token's K/V per layer. The paged path keeps the sentence as the unit of choice but attends whole
cache blocks, so the stock paged kernel reads them in place (no copy): a block's score is the best score of the
sentences that overlap it, sink and tail blocks are always in, and the top ``budget // block_size`` blocks per
(request, KV head) are attended. Sentences are contiguous, so taking blocks by that score is the same as taking
sentences in score order and adding the blocks each one touches, with the budget counted in blocks.

Everything here is pure torch and batched over ``R`` rows; the per-step part (:func:`plan_blocks`) runs once per
engine step, the per-layer part (:func:`select_blocks`) is a handful of ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIXED = 1e30       # score of sink / tail blocks: above any unit score
UNCOVERED = -1e38  # a block no valid unit overlaps: taken only if the budget has room left
NEG_INF = float("-inf")


@dataclass
class BlockPlan:
    """Per-step block-selection inputs of one group of ``R`` decode rows (``NB`` = most blocks of any row).

    base: ``[R, NB+1]`` score of a block before units are scored (``UNCOVERED`` in range, ``-inf`` beyond).
    fixed: ``[R, NB+1]`` bool, sink and tail blocks (always attended).
    drop: ``[R, 1, kmax]`` bool, top-k slots beyond the row's own block budget (None when every row uses kmax).
    num_blocks: ``[R]`` blocks attended per row and KV head; seq_lens: ``[R]`` tokens they hold.
    cand: ``[R, (NB+1)*M]`` per block, the ``M`` entries of its row's extended unit scores whose max is the block's
    score: the units overlapping it and ``UNCOVERED`` (a block no unit scores above that), or ``FIXED`` / ``-inf``
    alone for sink / tail and out-of-range blocks (the same max as scatter-max of each unit into the blocks it
    touches on top of ``base``, then ``FIXED`` / ``-inf`` pinned; as a gather, one op per layer instead of four).
    Extended scores: ``S`` unit scores, then the three constants.
    tie: ``[NB+1]`` int64 low half of the ranking keys (the lower block wins a tie; :func:`rank_keys`).
    """

    base: torch.Tensor
    fixed: torch.Tensor
    drop: torch.Tensor | None
    num_blocks: torch.Tensor
    seq_lens: torch.Tensor
    cand: torch.Tensor
    tie: torch.Tensor
    _ext: torch.Tensor | None = None
    _width: int | None = None

    @property
    def width(self) -> int:
        """Most blocks any row attends (read once per step: every layer's topk needs it, as a Python int)."""
        if self._width is None:
            self._width = int(self.num_blocks.max())
        return self._width

    @property
    def trash(self) -> int:
        """Column index used for padding; maps to no real block."""
        return self.base.shape[1] - 1

    def extended(self, num_kv_heads: int, num_units: int) -> torch.Tensor:
        """``[R, Hk, S+3]`` float32 workspace (reused by every layer of the step): unit scores, then ``UNCOVERED``,
        ``FIXED`` and ``-inf`` (the entries ``cand`` points at besides units)."""
        r = self.base.shape[0]
        if self._ext is None or self._ext.shape != (r, num_kv_heads, num_units + 3):
            self._ext = torch.empty(r, num_kv_heads, num_units + 3, dtype=torch.float32, device=self.base.device)
            self._ext[..., num_units:] = torch.tensor([UNCOVERED, FIXED, NEG_INF], device=self.base.device)
        return self._ext


def plan_blocks(starts: torch.Tensor, ends: torch.Tensor, unit_valid: torch.Tensor, seq_lens: torch.Tensor,
                budget: torch.Tensor, sinks: int, tail_start: torch.Tensor, block_size: int) -> BlockPlan:
    """Per-step block plan.

    starts / ends / unit_valid: ``[R, S]`` unit spans (padding invalid); seq_lens ``[R]`` context incl. the current
    token; budget ``[R]`` tokens; tail_start ``[R]`` first always-attended token at the end (the recent window,
    or the open sentence's start when that is earlier). The tail is cut so that sinks + tail fit the budget.
    """
    dev = seq_lens.device
    bs = block_size
    nb = (seq_lens + bs - 1) // bs
    k = torch.minimum(nb, (budget // bs).clamp(min=1))
    n_sink = torch.minimum(torch.full_like(k, -(-sinks // bs)), k - 1)
    tail_first = torch.maximum(tail_start.clamp(min=0) // bs, nb - (k - n_sink))
    width = int(nb.max())
    cols = torch.arange(width + 1, device=dev)[None, :]
    in_range = cols < nb[:, None]
    fixed = in_range & ((cols < n_sink[:, None]) | (cols >= tail_first[:, None]))
    base = torch.where(in_range, torch.tensor(UNCOVERED, device=dev), torch.tensor(NEG_INF, device=dev))
    first = starts.clamp(min=0) // bs
    last = torch.maximum((ends - 1).clamp(min=0) // bs, first)
    spread = int((last - first + 1)[unit_valid].max()) if bool(unit_valid.any()) else 1
    offs = torch.arange(spread, device=dev)
    unit_block = torch.minimum(first[..., None] + offs, last[..., None])
    unit_block = torch.where(unit_valid[..., None], unit_block, torch.full_like(unit_block, width))
    kmax = int(k.max())
    drop = (torch.arange(kmax, device=dev)[None, :] >= k[:, None])[:, None, :] if bool((k < kmax).any()) else None
    fill = seq_lens - (nb - 1) * bs
    real = unit_valid[..., None] & (offs <= (last - first)[..., None])        # (unit, k) entries, no repeats
    cand = _candidates(unit_block, real, fixed, in_range)
    tie = (1 << 31) - 1 - torch.arange(width + 1, device=dev)
    return BlockPlan(base, fixed, drop, k, (k - 1) * bs + fill, cand, tie)


def _candidates(unit_block: torch.Tensor, real: torch.Tensor, fixed: torch.Tensor,
                in_range: torch.Tensor) -> torch.Tensor:
    """``BlockPlan.cand`` from ``[R, S, K]`` unit blocks (``real``: entries that are a unit's own block)."""
    r, s, spread = unit_block.shape
    nb1 = fixed.shape[1]
    dev = unit_block.device
    row = torch.arange(r, device=dev).view(r, 1, 1).expand_as(unit_block)[real]
    unit = torch.arange(s, device=dev).view(1, s, 1).expand_as(unit_block)[real]
    group = row * nb1 + unit_block[real]
    order = torch.argsort(group * s + unit)
    group, unit = group[order], unit[order]
    counts = torch.bincount(group, minlength=r * nb1)
    m = int(counts.max()) + 1 if group.numel() else 1
    pos = torch.arange(group.numel(), device=dev) - (counts.cumsum(0) - counts)[group]
    cand = torch.full((r * nb1, m), s, dtype=torch.long, device=dev)          # s: UNCOVERED
    cand[group, pos] = unit
    cand = cand.view(r, nb1, m)
    cand[fixed] = s + 1                                                        # FIXED
    cand[~in_range] = s + 2                                                    # -inf (beyond the row, padding column)
    return cand.view(r, -1)


def block_scores(unit_scores: torch.Tensor, plan: BlockPlan, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, Hk, S]`` unit scores (``-inf`` = never) -> ``[R, Hk, NB+1]`` block scores (max over overlapping units;
    sink and tail blocks ``FIXED``). ``valid`` ``[R, Hk, S]`` (optional): units a head may take; the others score
    ``-inf`` (masked while the scores are copied into the plan's workspace)."""
    r, hk, s = unit_scores.shape
    ext = plan.extended(hk, s)
    if valid is None:
        ext[..., :s].copy_(unit_scores)
    else:
        torch.where(valid, unit_scores, ext[..., -1:], out=ext[..., :s])     # ext[..., -1] holds -inf
    nb1 = plan.base.shape[1]
    return ext.gather(2, plan.cand[:, None, :].expand(r, hk, -1)).view(r, hk, nb1, -1).amax(-1)


def recency_scores(plan: BlockPlan, num_kv_heads: int) -> torch.Tensor:
    """Block scores of the ``streaming`` policy: the latest blocks first (sinks and tail fixed)."""
    cols = torch.arange(plan.base.shape[1], device=plan.base.device, dtype=plan.base.dtype)
    scores = torch.where(plan.base > NEG_INF, cols[None, :], plan.base).masked_fill(plan.fixed, FIXED)
    return scores[:, None, :].expand(-1, num_kv_heads, -1)


SORT_MAX_NUMEL = 1536     # block scores up to which one stable sort ranks faster than keys + topk (CPU, measured)


def select_blocks(scores: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``[R, Hk, NB+1]`` block scores -> ``[R, Hk, kmax]`` ascending logical blocks (the row's last block last);
    slots beyond a row's block budget hold ``plan.trash``."""
    # the blocks of one sentence tie, and topk breaks ties differently for different widths, so a row would
    # select differently alone and in a batch: rank by score, then the earlier block. Small batches: a stable
    # descending sort (one op); larger ones: topk over exact unique keys (a stable sort costs ~3x more at 8 rows)
    if scores.numel() <= SORT_MAX_NUMEL:
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :plan.width]
    else:
        top = rank_keys(scores, plan.tie).topk(plan.width, dim=-1).indices
    if plan.drop is not None:
        top = top.masked_fill(plan.drop, plan.trash)
    return top.sort(dim=-1).values


def rank_keys(scores: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[..., N]`` -> int64 keys in the same order, ties broken towards the lower index, all distinct.

    The float's bits as an int32 order like the floats once the magnitude bits of negatives are flipped; the
    index goes into the low 32 bits (``tie``: ``(1 << 31) - 1 - column``, built once per step by the plan).
    """
    bits = (scores.float() + 0.0).view(torch.int32)      # + 0.0: -0.0 ties with 0.0, as in a sort
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    if tie is None:
        tie = (1 << 31) - 1 - torch.arange(scores.shape[-1], device=scores.device)
    return ordered * (1 << 32) + tie


def head_entries(block_table: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[R, Hk, M]`` int64 ids, in the head-split cache view ``[num_blocks * Hk, 1, block, ...]``, of each
    logical block of each row and KV head: physical block ``p`` of KV head ``h`` is ``p * Hk + h``."""
    heads = torch.arange(num_kv_heads, device=block_table.device).view(1, -1, 1)
    return block_table.long()[:, None, :] * num_kv_heads + heads


def head_split_tables(block_table: torch.Tensor, num_kv_heads: int, trash: int) -> torch.Tensor:
    """``[R, Hk, NB+1]`` int32 :func:`head_entries` with column ``trash`` -> 0. Built once per step;
    :func:`physical_tables` then costs one gather per layer."""
    return with_trash_column(head_entries(block_table, num_kv_heads), trash)


def with_trash_column(entries: torch.Tensor, trash: int) -> torch.Tensor:
    """``[R, Hk, M]`` head-split entries of each logical block -> the ``[R, Hk, NB+1]`` int32 tables
    :func:`physical_tables` reads (column ``trash`` -> 0)."""
    r, hk, _ = entries.shape
    return torch.cat([entries[:, :, :trash], entries.new_zeros(r, hk, 1)], dim=2).to(torch.int32)


def physical_tables(blocks: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Logical blocks ``[R, Hk, W]`` -> ``[R*Hk, W]`` int32 block tables of the head-split view."""
    r, hk, w = blocks.shape
    return tables.gather(2, blocks).view(r * hk, w)


def block_token_mask(blocks: torch.Tensor, plan: BlockPlan, seq_lens: torch.Tensor, block_size: int,
                     t_max: int) -> torch.Tensor:
    """``[R, Hk, T]`` token mask of the selected blocks (the oracle for tests and the retrieval trace)."""
    r, hk, _ = blocks.shape
    pos = torch.arange(t_max, device=blocks.device)
    chosen = torch.zeros(r, hk, plan.base.shape[1], dtype=torch.bool, device=blocks.device)
    chosen.scatter_(2, blocks, True)
    chosen[..., plan.trash] = False
    return chosen.gather(2, (pos // block_size).clamp(max=plan.trash)[None, None, :].expand(r, hk, t_max)) & (
        pos[None, None, :] < seq_lens[:, None, None])
