"""Block-granular selection (``core/blocks.py``) and the stock CPU kernel on the head-split cache view, checked
against an exact softmax over the same blocks. Random tensors; the kernel is vLLM's real CPU op."""

from __future__ import annotations

import math

import pytest
import torch

from sentencekv_vllm.core.blocks import (
    FIXED,
    block_scores,
    block_token_mask,
    head_split_tables,
    physical_tables,
    plan_blocks,
    recency_scores,
    select_blocks,
)
from sentencekv_vllm.core.reference import masked_attention
from sentencekv_vllm.core.selection import PAD_POS

BS = 32


def _plan(spans: list[list[tuple[int, int]]], seq_lens: list[int], budget: int, tail: int = 32, sinks: int = 32):
    s = max(len(x) for x in spans)
    starts = torch.full((len(spans), s), PAD_POS, dtype=torch.long)
    ends = starts.clone()
    valid = torch.zeros(len(spans), s, dtype=torch.bool)
    for i, sp in enumerate(spans):
        starts[i, :len(sp)] = torch.tensor([a for a, _ in sp])
        ends[i, :len(sp)] = torch.tensor([b for _, b in sp])
        valid[i, :len(sp)] = True
    seq = torch.tensor(seq_lens)
    plan = plan_blocks(starts, ends, valid, seq, torch.full_like(seq, budget), sinks, seq - tail, BS)
    return plan, s


def test_best_sentence_blocks_fixed_blocks_and_budget():
    # 10 blocks; sentences of 40 tokens: sentence j covers tokens [40j, 40j+40)
    spans = [[(40 * j, min(40 * j + 40, 320)) for j in range(8)]]
    plan, s = _plan(spans, [320], budget=5 * BS)
    scores = torch.full((1, 1, s), -1.0)
    scores[0, 0, 4] = 5.0            # tokens 160..199 -> blocks 5, 6
    blocks = select_blocks(block_scores(scores, plan), plan)
    assert plan.num_blocks.tolist() == [5]
    # sink block 0, tail block 9, best sentence's blocks 5 and 6, then one more (ties) block
    chosen = blocks[0, 0].tolist()
    assert chosen == sorted(chosen) and chosen[-1] == 9 and chosen[0] == 0
    assert {5, 6} <= set(chosen) and len(set(chosen)) == 5
    assert plan.seq_lens.tolist() == [5 * BS]          # last block full (320 = 10 * 32)


def test_rows_with_smaller_budgets_and_partial_last_block():
    spans = [[(0, 100), (100, 200), (200, 300)], [(0, 50), (50, 130)]]
    s = 3
    starts = torch.tensor([[0, 100, 200], [0, 50, PAD_POS]])
    ends = torch.tensor([[100, 200, 300], [50, 130, PAD_POS]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    seq = torch.tensor([310, 140])
    plan = plan_blocks(starts, ends, valid, seq, torch.tensor([6 * BS, 3 * BS]), 32, seq - 32, BS)
    assert plan.num_blocks.tolist() == [6, 3]
    blocks = select_blocks(block_scores(torch.randn(2, 3, s), plan), plan)
    # row 1: 3 real blocks then padding; its last real block is its last logical block (4, partly filled)
    assert blocks[1, :, 2].tolist() == [4, 4, 4] and (blocks[1, :, 3:] == plan.trash).all()
    assert (blocks[0, :, -1] == 9).all()
    assert plan.seq_lens.tolist() == [5 * BS + (310 - 9 * BS), 2 * BS + (140 - 4 * BS)]
    del spans


def test_open_sentence_tail_is_capped_by_budget():
    plan, _ = _plan([[(0, 200)]], [1000], budget=4 * BS, tail=700)
    fixed = plan.fixed[0].nonzero().flatten().tolist()
    assert fixed == [0, 29, 30, 31]            # one sink block, the last three blocks (cap: 4 blocks in all)


def test_streaming_takes_the_latest_blocks():
    plan, _ = _plan([[(0, 500)]], [640], budget=6 * BS)
    blocks = select_blocks(recency_scores(plan, 2), plan)
    assert blocks[0, 0].tolist() == [0, 15, 16, 17, 18, 19]
    assert (recency_scores(plan, 2)[0, 0, 0] == FIXED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stock_kernel_on_head_split_view_matches_exact_softmax(dtype):
    """The paged decode path: selected blocks read in place by vLLM's CPU kernel equal an exact softmax over the
    same blocks (block tables ``p * Hk + h``; each (row, KV head) its own sequence)."""
    ops = pytest.importorskip("vllm._custom_ops")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    gen = torch.Generator().manual_seed(0)
    hq, hk, d, r = 9, 3, 64, 2
    seq_lens = [700, 455]
    isa = _get_attn_isa(dtype, BS, d)
    nb = [math.ceil(t / BS) for t in seq_lens]
    cache = torch.zeros(sum(nb) + 3, hk, BS, 2 * d, dtype=dtype)
    kc, vc = cache.view(cache.shape[0], hk, 2 * BS, d).chunk(2, dim=2)
    perm = torch.randperm(cache.shape[0], generator=gen)[:sum(nb)]
    table = torch.zeros(r, max(nb), dtype=torch.int32)
    keys, values = [], []
    for i, t in enumerate(seq_lens):
        table[i, :nb[i]] = perm[sum(nb[:i]):sum(nb[:i + 1])].int()
        k = torch.randn(t, hk, d, generator=gen).to(dtype)
        v = torch.randn(t, hk, d, generator=gen).to(dtype)
        slots = (table[i, :nb[i]].long()[:, None] * BS + torch.arange(BS)).flatten()[:t]
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
        keys.append(k)
        values.append(v)
    spans = [[(j, min(j + 23, t)) for j in range(0, t, 23)] for t in seq_lens]
    plan, s = _plan(spans, seq_lens, budget=8 * BS)
    blocks = select_blocks(block_scores(torch.randn(r, hk, s, generator=gen), plan), plan)
    vtable = physical_tables(blocks, head_split_tables(table, hk, plan.trash))
    q = torch.randn(r, hq, d, generator=gen).to(dtype)
    seq = plan.seq_lens.repeat_interleave(hk).int()
    qsl = torch.arange(r * hk + 1, dtype=torch.int32)
    md = ops.cpu_attn_get_scheduler_metadata(r * hk, hq // hk, 1, d, seq, dtype, qsl, True, -1, isa, True)
    split = cache.view(cache.shape[0] * hk, 1, 2 * BS, d).chunk(2, dim=2)
    out = torch.empty(r * hk, hq // hk, d, dtype=dtype)
    ops.cpu_attention_with_kv_cache(q.view(r * hk, hq // hk, d), split[0], split[1], out, qsl, seq, d ** -0.5,
                                    True, None, -1, vtable, 0.0, md, None)
    mask = block_token_mask(blocks, plan, torch.tensor(seq_lens), BS, max(seq_lens))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, t in enumerate(seq_lens):
        ref = masked_attention(q[i].float(), keys[i].float(), values[i].float(), mask[i, :, :t], d ** -0.5)
        torch.testing.assert_close(out.view(r, hq, d)[i].float(), ref, atol=tol, rtol=tol)
        assert int(mask[i, 0].sum()) == int(plan.seq_lens[i])


def test_head_split_batch_is_batch_invariant():
    """A row's paged attention is bit-identical alone and inside a larger batch (no KV split in the partition)."""
    pytest.importorskip("vllm._custom_ops")
    from sentencekv_vllm.core.selection import UnitFeatures
    from sentencekv_vllm.eval.kernel import paged_step, random_cache

    hq, hk, d, t = 9, 3, 64, 3000
    cache = random_cache(4, t, hk, d, BS, torch.float32)
    q = torch.randn(4, hq, d, generator=torch.Generator().manual_seed(1))
    s = len(range(0, t, 20))
    cents = UnitFeatures(torch.randn(4, s, hk, d, generator=torch.Generator().manual_seed(2)),
                         torch.ones(4, s, hk, dtype=torch.bool))
    together = paged_step(cache, q, t, 512, cents)().clone().view(4, hq, d)
    alone = cache.__class__(cache.cache, cache.table[2:3], cache.isa, cache.block_size)
    one = paged_step(alone, q[2:3], t, 512, UnitFeatures(cents.a[2:3], cents.valid[2:3]))().view(1, hq, d)
    assert torch.equal(one[0], together[2])


def test_ties_break_the_same_way_at_any_width():
    """Blocks of one sentence tie; a row must select the same blocks alone and padded inside a wider batch."""
    spans = [[(40 * j, 40 * j + 40) for j in range(30)]]
    plan_one, s = _plan(spans, [1200], budget=8 * BS)
    wide = spans + [[(40 * j, 40 * j + 40) for j in range(60)]]
    plan_two, s2 = _plan(wide, [1200, 2400], budget=8 * BS)
    scores = torch.zeros(1, 2, s)          # every sentence ties
    padded = torch.zeros(2, 2, s2)
    one = select_blocks(block_scores(scores, plan_one), plan_one)
    two = select_blocks(block_scores(padded, plan_two), plan_two)
    assert torch.equal(one[0], two[0])


def test_both_rankings_select_the_same_blocks(monkeypatch):
    """Small score tensors rank with one stable sort, larger ones with exact keys + topk: a row alone and the same
    row in a wide batch take different branches, so they must agree on ties, +-0.0, +-inf and FIXED."""
    from sentencekv_vllm.core import blocks

    gen = torch.Generator().manual_seed(3)
    spans = [[(40 * j, 40 * j + 40) for j in range(120)]] * 8
    plan, s = _plan(spans, [4800] * 8, budget=12 * BS)
    scores = torch.randint(-3, 4, (8, 3, s), generator=gen).float()      # many ties
    scores[0, 0, :5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), -0.0])
    bs = block_scores(scores, plan)
    assert bs.numel() > blocks.SORT_MAX_NUMEL
    keyed = select_blocks(bs, plan)
    monkeypatch.setattr(blocks, "SORT_MAX_NUMEL", bs.numel())
    assert torch.equal(select_blocks(bs, plan), keyed)


def _scatter_max_scores(unit_scores: torch.Tensor, plan, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """The direct formula the gather in ``block_scores`` replaces: every unit's score max-ed into each block its
    span touches, on top of the plan's base scores; then sink / tail blocks ``FIXED`` and the padding column
    ``-inf``."""
    r, hk, _ = unit_scores.shape
    scores = plan.base[:, None, :].expand(r, hk, -1).clone()
    for i, row in enumerate(spans):
        for j, (a, b) in enumerate(row):
            for blk in range(a // BS, (b - 1) // BS + 1):
                scores[i, :, blk] = torch.maximum(scores[i, :, blk], unit_scores[i, :, j])
    pinned = plan.fixed.clone()
    pinned[:, plan.trash] = True
    pin_value = torch.where(plan.fixed, torch.tensor(FIXED), torch.tensor(float("-inf")))
    return torch.where(pinned[:, None, :], pin_value[:, None, :], scores)


def test_block_scores_equal_scatter_max_with_masked_units():
    """Random spans (units of 1-90 tokens, some padding rows), scores with -inf and exact ties, per-head masks."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        spans, lens = [], []
        for _ in range(3):
            n = int(torch.randint(300, 900, (1,), generator=gen))
            cuts = sorted(set(torch.randint(1, n, (int(torch.randint(2, 20, (1,), generator=gen)),),
                                            generator=gen).tolist()))
            edges = [0, *cuts, n]
            spans.append(list(zip(edges[:-1], edges[1:], strict=True)))
            lens.append(n)
        plan, s = _plan(spans, lens, budget=6 * BS)
        scores = torch.randn(3, 2, s, generator=gen).round(decimals=1)       # exact ties across units
        scores[torch.rand(3, 2, s, generator=gen) < 0.2] = float("-inf")
        valid = torch.rand(3, 2, s, generator=gen) > 0.3
        masked = scores.masked_fill(~valid, float("-inf"))
        expected = _scatter_max_scores(masked, plan, spans)
        assert torch.equal(block_scores(scores, plan, valid), expected), trial
        assert torch.equal(block_scores(masked, plan), expected), trial
