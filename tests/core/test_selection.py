"""Index, selection policies and reference attention on random tensors."""

import pytest
import torch

from sentencekv_vllm.core.attention import gathered_attention
from sentencekv_vllm.core.index import page_bounds, retention_mask, sentence_centroids, snapkv_importance
from sentencekv_vllm.core.reference import RunningMean, SentenceIndex, gather_selected, masked_attention
from sentencekv_vllm.core.selection import PAD_POS, SelectionBatch, UnitFeatures, group_mean_query
from sentencekv_vllm.policies import select

HQ, HK, D = 9, 3, 64
SCALE = D ** -0.5


def random_spans(t: int, gen: torch.Generator) -> torch.Tensor:
    cuts = sorted(set(torch.randint(1, t, (t // 12,), generator=gen).tolist()))
    ends = torch.tensor(cuts + [t])
    return torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]]), ends], 1)


def batch_for(spans_list, seq_lens, budget, sinks=32, recent=32):
    s = max(len(sp) for sp in spans_list)
    starts = torch.full((len(spans_list), s), PAD_POS, dtype=torch.long)
    ends = starts.clone()
    for i, sp in enumerate(spans_list):
        starts[i, :len(sp)], ends[i, :len(sp)] = sp[:, 0], sp[:, 1]
    return SelectionBatch.make(starts, ends, torch.tensor(seq_lens), budget, sinks, recent)


def features(cents, valids, s):
    a = torch.zeros(len(cents), s, HK, D)
    v = torch.zeros(len(cents), s, HK, dtype=torch.bool)
    for i, (c, m) in enumerate(zip(cents, valids, strict=False)):
        a[i, :len(c)], v[i, :len(c)] = c, m
    return UnitFeatures(a, v)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("policy", ["sentencekv", "streaming", "full", "quest"])
def test_budget_never_exceeded_sinks_recent_present(gen, policy):
    lens = [900, 2000, 333]
    spans = [random_spans(t, gen) for t in lens]
    keys = [torch.randn(t, HK, D, generator=gen) for t in lens]
    if policy == "quest":
        bounds = [page_bounds(k, sp) for k, sp in zip(keys, spans, strict=False)]
        f = features([b[0] for b in bounds], [torch.ones(len(sp), HK, dtype=torch.bool) for sp in spans],
                     max(map(len, spans)))
        f.b = features([b[1] for b in bounds], [torch.ones(len(sp), HK, dtype=torch.bool) for sp in spans],
                       max(map(len, spans))).a
    else:
        cv = [sentence_centroids(k, sp) for k, sp in zip(keys, spans, strict=False)]
        f = features([c for c, _ in cv], [v for _, v in cv], max(map(len, spans)))
    batch = batch_for(spans, lens, 256)
    q = group_mean_query(torch.randn(3, HQ, D, generator=gen), HK)
    mask = select(policy, q, f, batch)
    counts = mask.sum(-1)
    for r, t in enumerate(lens):
        expected = t if policy == "full" else min(256, t)
        assert (counts[r] == expected).all(), (policy, counts[r], expected)
        assert mask[r, :, :32].all() and mask[r, :, t - 32:t].all()
        assert not mask[r, :, t:].any()


def test_budget_covers_everything_equals_full_attention(gen):
    t = 700
    spans = random_spans(t, gen)
    k, v = torch.randn(t, HK, D, generator=gen), torch.randn(t, HK, D, generator=gen)
    cent, valid = sentence_centroids(k, spans)
    q = torch.randn(HQ, D, generator=gen)
    mask = select("sentencekv", group_mean_query(q[None], HK), features([cent], [valid], len(spans)),
                  batch_for([spans], [t], 1024))[0]
    assert mask.all()
    out = masked_attention(q, k, v, mask, SCALE)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None, :], k.permute(1, 0, 2).repeat_interleave(3, 0)[None],
        v.permute(1, 0, 2).repeat_interleave(3, 0)[None], scale=SCALE)[0, :, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_selection_shared_by_query_heads_of_a_kv_head(gen):
    """Selection is per KV head; query heads of a group attend through the same mask."""
    t = 600
    k, v = torch.randn(t, HK, D, generator=gen), torch.randn(t, HK, D, generator=gen)
    q = torch.randn(HQ, D, generator=gen)
    mask = torch.rand(HK, t, generator=gen) < 0.3
    out = masked_attention(q, k, v, mask, SCALE)
    for h in range(HQ):
        kv = h // (HQ // HK)
        sel = mask[kv]
        p = ((q[h] @ k[sel, kv].T) * SCALE).softmax(-1)
        torch.testing.assert_close(out[h], p @ v[sel, kv], atol=1e-5, rtol=1e-5)


def test_needle_sentence_selected_random_one_not(gen):
    t = 3000
    spans = random_spans(t, gen)
    k = torch.randn(t, HK, D, generator=gen)
    direction = torch.randn(HK, D, generator=gen)
    needle = len(spans) // 2
    s, e = spans[needle].tolist()
    k[s:e] += 3 * direction
    cent, valid = sentence_centroids(k, spans)
    q = direction.repeat_interleave(HQ // HK, 0)[None]          # query aligned with the needle keys
    mask = select("sentencekv", group_mean_query(q, HK), features([cent], [valid], len(spans)),
                  batch_for([spans], [t], 256))[0]
    assert mask[:, s:e].all()
    other = (needle + len(spans) // 4) % len(spans)
    os_, oe = spans[other].tolist()
    assert not mask[:, os_:oe].all()
    stream = select("streaming", None, None, batch_for([spans], [t], 256))[0]
    assert not stream[:, s:e].any()


def test_snapkv_importance_matches_a_per_head_loop(gen):
    """Window queries' causal softmax attention summed over the window, averaged over each KV head's query group,
    pooled along tokens; the window itself always highest."""
    t, w, pool = 300, 16, 7
    k = torch.randn(t, HK, D, generator=gen)
    obs = torch.randn(w, HQ, D, generator=gen)
    g = HQ // HK
    want = torch.zeros(HK, t)
    for h in range(HK):
        for j in range(g):
            for i in range(w):
                pos = t - w + i                          # the query's own position: it sees keys 0..pos
                att = torch.softmax(k[:pos + 1, h] @ obs[i, h * g + j] / D ** 0.5, dim=0)
                want[h, :pos + 1] += att / g
    want = torch.nn.functional.avg_pool1d(want[:, None], pool, 1, pool // 2, count_include_pad=False)[:, 0]
    got = snapkv_importance(obs, k, pool)
    torch.testing.assert_close(got[:, :t - w], want[:, :t - w], rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[:, t - w:]).all()


def test_snapkv_retention_and_centroids(gen):
    t, w = 500, 32
    k = torch.randn(t, HK, D, generator=gen)
    obs = torch.randn(w, HQ, D, generator=gen)
    imp = snapkv_importance(obs, k, 7)
    keep = retention_mask(imp, 200)
    assert imp.shape == (HK, t) and (keep.sum(-1) == 200).all()
    assert keep[:, t - w:].all(), "observation window is always retained"
    spans = random_spans(t, gen)
    cent, valid = sentence_centroids(k, spans, keep, keep_unretained=False)
    for i, (s, e) in enumerate(spans.tolist()):
        for h in range(HK):
            sel = keep[h, s:e]
            assert bool(valid[i, h]) == bool(sel.any())
            if sel.any():
                torch.testing.assert_close(cent[i, h], k[s:e, h][sel].mean(0))


def test_incremental_index_equals_batch(gen):
    """Prompt built in one go, generated sentences appended token by token == batch build over all tokens."""
    t_prompt, t_gen = 400, 150
    k = torch.randn(t_prompt + t_gen, HK, D, generator=gen)
    obs = torch.randn(16, HQ, D, generator=gen)
    p_spans = random_spans(t_prompt, gen)
    idx = SentenceIndex.build(k[:t_prompt], obs, p_spans, semantic_budget=120)
    gen_ends = [t_prompt + 17, t_prompt + 60, t_prompt + 61 + 40, t_prompt + t_gen]
    acc, start = RunningMean(), t_prompt
    for pos in range(t_prompt, t_prompt + t_gen):
        acc.push(k[pos])
        if pos + 1 in gen_ends:
            idx.append(start, pos + 1, acc.mean())
            acc.reset()
            start = pos + 1
    gen_spans = [[s, e] for s, e in zip([t_prompt] + gen_ends[:-1], gen_ends, strict=True)]
    all_spans = torch.cat([p_spans, torch.tensor(gen_spans)])
    keep = torch.ones(HK, t_prompt + t_gen, dtype=torch.bool)
    keep[:, :t_prompt] = retention_mask(snapkv_importance(obs, k[:t_prompt], 7), 120)
    cent, valid = sentence_centroids(k, all_spans, keep)
    assert torch.equal(idx.spans, all_spans)
    torch.testing.assert_close(idx.centroids, cent, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx.valid, valid)


def test_gathered_attention_matches_masked(gen):
    lens = [300, 120]
    q = torch.randn(2, HQ, D, generator=gen)
    ks = [torch.randn(t, HK, D, generator=gen) for t in lens]
    vs = [torch.randn(t, HK, D, generator=gen) for t in lens]
    mask = torch.zeros(2, HK, 300, dtype=torch.bool)
    for r, t in enumerate(lens):
        mask[r, :, :t] = torch.rand(HK, t, generator=gen) < 0.4
        mask[r, :, :4] = True
    width = int(mask.sum(-1).max())
    pos, valid = gather_selected(mask, width)
    kk = torch.stack([torch.nn.functional.pad(k, (0, 0, 0, 0, 0, 300 - k.shape[0])) for k in ks])
    vv = torch.stack([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 300 - v.shape[0])) for v in vs])
    hidx = torch.arange(HK)[None, :, None]
    out = gathered_attention(q, kk[torch.arange(2)[:, None, None], pos, hidx],
                             vv[torch.arange(2)[:, None, None], pos, hidx], valid, SCALE)
    for r, t in enumerate(lens):
        torch.testing.assert_close(out[r], masked_attention(q[r], ks[r], vs[r], mask[r, :, :t], SCALE))


@pytest.mark.parametrize("policy", ["sentencekv", "streaming", "quest"])
def test_select_positions_equals_mask(gen, policy):
    """The decode hot path (segment arithmetic) selects exactly the tokens of the reference mask."""
    from sentencekv_vllm.policies import select_positions

    lens = [900, 2000, 333, 1200]
    spans = [random_spans(t, gen) for t in lens]
    keys = [torch.randn(t, HK, D, generator=gen) for t in lens]
    s = max(map(len, spans))
    if policy == "quest":
        bounds = [page_bounds(k, sp) for k, sp in zip(keys, spans, strict=True)]
        ones = [torch.ones(len(sp), HK, dtype=torch.bool) for sp in spans]
        f = features([b[0] for b in bounds], ones, s)
        f.b = features([b[1] for b in bounds], ones, s).a
    else:
        cv = [sentence_centroids(k, sp) for k, sp in zip(keys, spans, strict=True)]
        f = features([c for c, _ in cv], [v for _, v in cv], s)
    batch = batch_for(spans, lens, torch.tensor([256, 300, 128, 512]))
    q = group_mean_query(torch.randn(4, HQ, D, generator=gen), HK)
    mask = select(policy, q, f, batch).expand(-1, HK, -1)
    pos, valid = select_positions(policy, q, f, batch, 512)
    ref_pos, ref_valid = gather_selected(mask, 512)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(pos, ref_pos)


def test_gathered_attention_is_batch_invariant():
    gen = torch.Generator().manual_seed(5)
    r, w = 6, 300
    q, k, v = torch.randn(r, HQ, D, generator=gen), torch.randn(r, HK, w, D, generator=gen), torch.randn(
        r, HK, w, D, generator=gen)
    valid = torch.ones(r, HK, w, dtype=torch.bool)
    valid[2, :, 250:] = False
    together = gathered_attention(q, k, v, valid, SCALE)
    for i in range(r):
        assert torch.equal(gathered_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], valid[i:i + 1], SCALE)[0],
                           together[i])
