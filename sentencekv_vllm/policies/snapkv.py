"""SnapKV baseline (Li et al., 2024): token eviction at prefill.

Prefill: the last ``obs_window`` prompt queries score every prompt token (softmax attention summed over the window,
averaged over each KV head's query group, average-pooled with ``pool_kernel``; the window itself always scores
highest: ``core.index.snapkv_importance``), and each KV head keeps its ``τ`` most important prompt tokens, ranked,
chosen once. Decode: no query, no units. Like every policy here the step attends the sinks and the recent window
(or the open generated sentence) plus a middle filled up to ``τ`` tokens: generated tokens first (SnapKV never
evicts them), newest first, then the retained prompt tokens in importance order. While the generation is shorter
than the recent window that is exactly SnapKV's cache; past it, each generated token pushes out the least
important retained prompt token, so a step never attends more than ``τ`` tokens.

Its index units are sentences only because it shares the sentence server (it reads none of their features), so a
request may switch to it on any server whose policy uses sentences. The choice is per token, which whole blocks
cannot express: SnapKV rows always take the exact path (``paged = False``).
"""

from __future__ import annotations

import torch

from sentencekv_vllm.core.index import snapkv_importance
from sentencekv_vllm.core.selection import SelectionBatch, UnitFeatures
from sentencekv_vllm.policies.base import Policy, PolicyConfig, TokenFeatures

_FAR = 2**62     # sorts after every real position


class SnapKV(Policy):
    name = "snapkv"
    summary = "SnapKV prefill eviction: the τ most important prompt tokens per KV head, chosen once from the " \
              "observation window"
    paged = False
    token_level = True

    def build_tokens(self, keys: torch.Tensor, obs: torch.Tensor | None, cfg: PolicyConfig) -> torch.Tensor:
        """``[Hk, K]`` prompt positions, most important first, ``K = min(τ, T)``. Without captured window queries
        (nothing to score with) the most recent tokens rank first."""
        t, hk, _ = keys.shape
        k = min(cfg.budget, t)
        if obs is None:
            return torch.arange(t - 1, t - 1 - k, -1, device=keys.device).expand(hk, k).contiguous()
        importance = snapkv_importance(obs, keys, cfg.pool_kernel)
        return importance.topk(k, dim=-1, sorted=True).indices

    def positions(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch, width: int,
                  details: dict | None = None, tokens: TokenFeatures | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        assert tokens is not None, "snapkv selects from the tokens it retained at prefill"
        seq, sinks, recent = batch.seq_lens, batch.sinks, batch.recent
        hk = tokens.order.shape[1]
        sink_len = sinks.minimum(seq)
        tail_start = (seq - recent).maximum(sink_len)
        room = (batch.budget - sink_len - (seq - tail_start)).clamp(min=0)
        order = torch.cat([_generated_newest_first(tokens.prompt_lens, tail_start, hk), tokens.order], dim=-1)
        middle = (order >= sink_len[:, None, None]) & (order < tail_start[:, None, None])
        taken = middle & (middle.cumsum(-1) <= room[:, None, None])
        pos = torch.arange(max(width, 1), device=seq.device)
        sink_pos = torch.where(pos < sink_len[:, None], pos, _FAR)
        tail_pos = tail_start[:, None] + pos
        tail_pos = torch.where(tail_pos < seq[:, None], tail_pos, _FAR)
        fixed = torch.cat([sink_pos, tail_pos], dim=-1)[:, None, :].expand(-1, hk, -1)
        chosen = torch.cat([fixed, torch.where(taken, order, _FAR)], dim=-1).sort(dim=-1).values[..., :width]
        valid = chosen < _FAR
        return chosen.masked_fill(~valid, 0), valid

    def mask(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
             details: dict | None = None, tokens: TokenFeatures | None = None) -> torch.Tensor:
        width = int(batch.seq_lens.max())
        pos, valid = self.positions(query, feats, batch, width, details, tokens)
        out = torch.zeros(*pos.shape[:2], width + 1, dtype=torch.bool, device=pos.device)
        return out.scatter_(-1, pos.masked_fill(~valid, width), True)[..., :width]


def _generated_newest_first(prompt_lens: torch.Tensor, tail_start: torch.Tensor, hk: int) -> torch.Tensor:
    """``[R, Hk, G]`` generated positions before the tail, newest first (``-1`` pads shorter rows)."""
    count = (tail_start - prompt_lens).clamp(min=0)
    g = int(count.max()) if count.numel() else 0
    step = torch.arange(g, device=prompt_lens.device)
    gen = tail_start[:, None] - 1 - step
    return torch.where(step < count[:, None], gen, -1)[:, None, :].expand(-1, hk, -1)
