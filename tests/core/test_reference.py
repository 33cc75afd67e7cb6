"""The authors' SentenceKV, step for step (``policies/reference.py``), on a case small enough to work out by hand.

Prompt of 10 tokens, sentences [0, 3) [3, 7) [7, 10) (punctuation at 2 and 6), one KV head shared by two query
heads, observation window 3, max-pooling kernel 3, semantic budget 6 (3 prefix tokens + the window).
Head 0 queries along x and only key 1 points along x; head 1 queries along y and only key 5 points along y.
"""

from __future__ import annotations

import torch

from sentencekv_vllm.policies.reference import decode_step, prefill

X, Y, ZERO = (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)


def small_case():
    keys = torch.zeros(10, 1, 2)
    keys[1, 0] = torch.tensor([10.0, 0.0])
    keys[5, 0] = torch.tensor([0.0, 10.0])
    queries = torch.tensor([X, Y]).expand(10, 2, 2).clone()
    punct = [i in (2, 6) for i in range(10)]
    return prefill(queries, keys, punct, semantic_budget=6, window=3, kernel=3)


def test_prefill_keeps_each_query_heads_max_pooled_best_prefix_tokens_and_the_window():
    """Head 0's summed attention spikes at 1, so max pooling (kernel 3) ties 0, 1 and 2 at the top: the three kept
    prefix tokens are exactly those; head 1's spike at 5 gives 4, 5, 6. Sentence vectors average the survivors:
    sentence 1 lost every token in head 0 (zero vector, nothing to take), sentence 0 in head 1."""
    st = small_case()
    assert st.cache_pos.tolist() == [[0, 1, 2, 7, 8, 9], [4, 5, 6, 7, 8, 9]]
    assert st.lengths.tolist() == [[3, 0, 3], [0, 3, 3]]
    torch.testing.assert_close(st.vectors[0, 0], torch.tensor([10 / 3, 0.0]))
    torch.testing.assert_close(st.vectors[1, 1], torch.tensor([0.0, 10 / 3]))
    assert not st.vectors[0, 1].any() and not st.vectors[1, 0].any()


def test_decode_attends_whole_cache_at_sentence_starts_else_cache_ends_plus_best_sentences():
    """Budget 4 with 1 sink and 1 recent entry (room 2). Sinks and recent are entries of the *compressed* cache,
    sentence tokens must lie strictly inside (sinks, C - recent): cache index 1 (head 0's spike) never
    qualifies, as in the reference."""
    st = small_case()
    q = torch.tensor([X, Y])
    k = torch.zeros(1, 2)

    def step(pos: int, punct: bool = False) -> list[list[int]]:
        return decode_step(st, q, k, pos, punct, budget=4, sinks=1, recent=1)

    assert step(10) == [[0, 1, 2, 7, 8, 9, 10], [4, 5, 6, 7, 8, 9, 10]]          # first token: whole cache
    assert step(11) == [[0, 2, 7, 11], [4, 6, 7, 11]]                             # sentence 0 / 1 first
    assert step(12, punct=True) == [[0, 1, 2, 7, 8, 9, 10, 11, 12], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert st.lengths.tolist() == [[3, 0, 3, 3], [0, 3, 3, 3]]                    # the generated sentence joined
    assert step(13) == [[0, 1, 2, 7, 8, 9, 10, 11, 12, 13], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert step(14) == [[0, 2, 7, 14], [4, 6, 7, 14]]
