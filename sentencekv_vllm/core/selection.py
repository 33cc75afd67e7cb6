"""Selection mechanics shared by the policies (``sentencekv_vllm/policies/``): budget filling and token positions.

Batched over ``R`` requests (padded). A scoring policy only *scores* units (sentences or pages); one shared
budget filler (``fill_budget``) turns scores into a token mask, the way kvpress separates scoring from mechanics:

    scores ``[R, Hk, S]``  --fill_budget-->  allowed tokens per unit ``[R, Hk, S]``  --token_mask-->  ``[R, Hk, T]``

Sinks (first ``sinks`` tokens) and the recent window (last ``recent`` tokens) are always in. Units are clipped to
the middle region ``[sinks, L - recent)`` so no token is counted twice; the last unit taken is truncated to fit,
so a step attends to exactly ``min(budget, L)`` tokens per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
PAD_POS = 2**31 - 1


@dataclass
class SelectionBatch:
    """Per-step inputs shared by all layers.

    starts / ends: ``[R, S]`` unit spans, sorted; padding entries have ``start == end >= seq_len`` (use
    ``PAD_POS``) so ``ends`` stays sorted; seq_lens ``[R]`` context incl. current token;
    budget ``[R]``; sinks / recent: ``[R]`` or int.
    """

    starts: torch.Tensor
    ends: torch.Tensor
    seq_lens: torch.Tensor
    budget: torch.Tensor
    sinks: torch.Tensor
    recent: torch.Tensor

    @classmethod
    def make(cls, starts: torch.Tensor, ends: torch.Tensor, seq_lens: torch.Tensor, budget: torch.Tensor | int,
             sinks: int | torch.Tensor, recent: int | torch.Tensor) -> "SelectionBatch":
        r = seq_lens.shape[0]

        def vec(x: int | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.long, device=seq_lens.device).expand(r).clone()

        return cls(starts.long(), ends.long(), seq_lens.long(), vec(budget), vec(sinks), vec(recent))

    def clipped(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit spans clipped to the middle region ``[sinks, L - recent)``; returns (start, length) ``[R, S]``."""
        lo = self.sinks[:, None]
        hi = (self.seq_lens - self.recent)[:, None]
        cs = self.starts.clamp(min=lo).minimum(hi)
        ce = self.ends.clamp(max=hi).maximum(cs)
        return cs, ce - cs


def fill_budget(scores: torch.Tensor, lengths: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Take units in descending score order until ``room`` tokens are used; the last unit is truncated.

    scores ``[R, Hk, S]`` (``-inf`` = never take); lengths ``[R, S]``; room ``[R]``.
    Returns allowed token counts ``[R, Hk, S]`` (a prefix of each unit).
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    lens = lengths[:, None, :].expand_as(scores)
    sorted_lens = lens.gather(-1, order)
    sorted_ok = scores.gather(-1, order) > NEG_INF
    sorted_lens = sorted_lens * sorted_ok
    before = sorted_lens.cumsum(-1) - sorted_lens
    allowed_sorted = (room[:, None, None] - before).clamp(min=0).minimum(sorted_lens)
    return torch.zeros_like(allowed_sorted).scatter_(-1, order, allowed_sorted)


def token_mask(batch: SelectionBatch, allowed: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``[R, Hk, T]`` bool: sinks + recent + the allowed prefix of each unit's clipped span."""
    r, hk, s = allowed.shape
    t_max = int(batch.seq_lens.max()) if max_len is None else max_len
    pos = torch.arange(t_max, device=allowed.device)
    cs, _ = batch.clipped()
    # unit of each position: spans are sorted and contiguous per row
    uid = torch.searchsorted(batch.ends.contiguous(), pos[None, :].expand(r, t_max).contiguous(), right=True)
    uid = uid.clamp(max=s - 1)
    start_of = cs.gather(1, uid)                                            # [R, T]
    allow_of = allowed.gather(2, uid[:, None, :].expand(r, hk, t_max))     # [R, Hk, T]
    in_unit = (pos[None, :] >= start_of)[:, None, :] & ((pos[None, :] - start_of)[:, None, :] < allow_of)
    L = batch.seq_lens[:, None]
    fixed = (pos[None, :] < batch.sinks[:, None]) | (pos[None, :] >= L - batch.recent[:, None])
    return (in_unit | fixed[:, None, :]) & (pos[None, :] < L)[:, None, :]


@dataclass
class UnitFeatures:
    """Per-unit features, padded to ``[R, S, Hk, D]``; ``valid`` ``[R, S, Hk]`` masks padding/discarded units.

    ``a`` / ``b`` are a policy's first / second feature slot (``Policy.features``): sentencekv's ``a`` is the
    centroid; quest's ``a`` / ``b`` are the page's element-wise min / max key. ``scratch``: ``a`` / ``b`` are
    copies the caller will not read again, so a scorer may work in them in place (the decode hot path gathers
    them into a reused workspace; a fresh product buffer per layer costs an mmap + page faults on CPU once it
    passes glibc's mmap threshold, several times the arithmetic at batch 8).
    """

    a: torch.Tensor
    valid: torch.Tensor
    b: torch.Tensor | None = None
    scratch: bool = False


def group_mean_query(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[R, Hq, D]`` -> ``[R, Hk, D]``: GQA-native selection scores a KV head with its group's mean query."""
    r, hq, d = query.shape
    return query.float().view(r, num_kv_heads, hq // num_kv_heads, d).mean(2)


def positions_from_allowed(eff: SelectionBatch, allowed: torch.Tensor,
                           width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection :func:`token_mask` describes, as ascending positions ``[R, Hk, width]`` + valid mask.

    Built from segment lengths (sinks, each unit's allowed prefix, the recent window) in ``O(width log S)``
    without materialising a ``[R, Hk, T]`` mask: this is the decode hot path.
    """
    r, hk, s = allowed.shape
    cs, _ = eff.clipped()
    seq = eff.seq_lens
    sink_len = eff.sinks.minimum(seq)
    recent_start = (seq - eff.recent).maximum(sink_len)
    starts = torch.cat([torch.zeros(r, 1, dtype=torch.long, device=seq.device), cs,
                        recent_start[:, None]], dim=1)[:, None, :].expand(r, hk, s + 2)
    lens = torch.cat([sink_len[:, None, None].expand(r, hk, 1), allowed,
                      (seq - recent_start)[:, None, None].expand(r, hk, 1)], dim=2)
    ends = lens.cumsum(-1)
    slot = torch.arange(width, device=seq.device).expand(r, hk, width).contiguous()
    seg = torch.searchsorted(ends, slot, right=True).clamp(max=s + 1)
    pos = starts.gather(2, seg) + slot - (ends.gather(2, seg) - lens.gather(2, seg))
    valid = slot < ends[..., -1:]
    return pos.masked_fill(~valid, 0), valid


