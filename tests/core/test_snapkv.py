"""SnapKV baseline (``policies/snapkv.py``) on random tensors against a hand-written expectation: which prompt
tokens it keeps at prefill, and which tokens a decode step attends."""

from __future__ import annotations

import math

import torch

from sentencekv_vllm.core.selection import SelectionBatch
from sentencekv_vllm.policies import TokenFeatures, get, select

HQ, HK, D = 6, 2, 16


class Cfg:
    budget, pool_kernel, semantic_budget, keep_unretained = 40, 5, 80, True


def hand_importance(obs: torch.Tensor, keys: torch.Tensor, kernel: int) -> list[list[float]]:
    """SnapKV's score, one number at a time: per KV head, the window queries' causal softmax attention summed over
    the window, averaged over the head's query group, average-pooled (window of ``kernel``, clipped at the ends);
    the window itself always kept (``inf``)."""
    w, t, g = obs.shape[0], keys.shape[0], HQ // HK
    scores = []
    for h in range(HK):
        attn = [0.0] * t
        for qh in range(h * g, (h + 1) * g):
            for i in range(w):
                pos = t - w + i
                logits = [float(obs[i, qh] @ keys[j, h]) / math.sqrt(D) for j in range(pos + 1)]
                top = max(logits)
                exp = [math.exp(x - top) for x in logits]
                for j in range(pos + 1):
                    attn[j] += exp[j] / sum(exp) / g
        half = kernel // 2
        pooled = [sum(attn[max(0, j - half):j + half + 1]) / len(attn[max(0, j - half):j + half + 1])
                  for j in range(t)]
        scores.append([math.inf if j >= t - w else pooled[j] for j in range(t)])
    return scores


def test_prefill_keeps_the_budget_most_important_tokens_per_head():
    gen = torch.Generator().manual_seed(0)
    t, w = 120, 8
    keys, obs = torch.randn(t, HK, D, generator=gen), torch.randn(w, HQ, D, generator=gen)
    order = get("snapkv").build_tokens(keys, obs, Cfg())
    hand = hand_importance(obs, keys, Cfg.pool_kernel)
    assert order.shape == (HK, Cfg.budget)
    for h in range(HK):
        expected = sorted(range(t), key=lambda j: -hand[h][j])[:Cfg.budget]
        assert set(order[h].tolist()) == set(expected)
        ranked = [hand[h][j] for j in order[h].tolist()]
        assert ranked == sorted(ranked, reverse=True), "kept tokens come most important first"
        assert set(range(t - w, t)) <= set(order[h].tolist()), "the observation window is always kept"


def hand_step(order: list[int], prompt_len: int, seq_len: int, budget: int, sinks: int, recent: int) -> list[int]:
    """Sinks, the recent window, then the middle: generated tokens newest first, then kept prompt tokens in
    importance order, until the budget is used."""
    fixed = set(range(min(sinks, seq_len))) | set(range(max(seq_len - recent, sinks), seq_len))
    room = budget - len(fixed)
    middle = [p for p in range(seq_len - recent - 1, prompt_len - 1, -1)] + order
    taken = [p for p in middle if sinks <= p < seq_len - recent][:room]
    return sorted(fixed | set(taken))


def test_decode_step_attends_sinks_recent_generated_then_kept_prompt_tokens():
    gen = torch.Generator().manual_seed(1)
    prompts, seqs = [300, 500], [350, 510]          # row 0: 34 generated tokens before the recent window
    budget, sinks, recent = 128, 8, 16
    orders = [torch.stack([torch.randperm(p, generator=gen)[:budget] for _ in range(HK)]) for p in prompts]
    batch = SelectionBatch.make(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                                torch.tensor(seqs), budget, sinks, recent)
    tokens = TokenFeatures(torch.stack(orders), torch.tensor(prompts))
    pos, valid = get("snapkv").positions(None, None, batch, budget, tokens=tokens)
    mask = select("snapkv", None, None, batch, tokens=tokens)
    for r in range(2):
        for h in range(HK):
            expected = hand_step(orders[r][h].tolist(), prompts[r], seqs[r], budget, sinks, recent)
            assert len(expected) == budget
            assert pos[r, h][valid[r, h]].tolist() == expected
            assert mask[r, h].nonzero().flatten().tolist() == expected
    assert set(range(300, 350)) <= set(pos[0, 0][valid[0, 0]].tolist()), "generated tokens are never evicted"
