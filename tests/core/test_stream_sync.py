"""Decode-time segmentation stays in sync with the request's own token ids (issue #13 item 5, #15 item 4):
rows that skipped the planner are caught up, async scheduling's ``-1`` placeholders are fed a step later."""

from __future__ import annotations

import numpy as np

from sentencekv_vllm.core.segmentation import IncrementalSegmenter, LengthRule, TokenClasses
from sentencekv_vllm.integration.planner import _feed
from sentencekv_vllm.integration.state import RequestState

WORDS = ["a", " b", " c", ".", " d", " e", " f", "!", " g", " h"]
CLASSES = TokenClasses.from_texts(WORDS)
A, B, C, DOT, D, E, F, BANG, G, H = range(len(WORDS))


def request(prompt: list[int]) -> RequestState:
    req = RequestState("r", None, 0, len(prompt), seen=len(prompt))   # type: ignore[arg-type]
    req.stream = IncrementalSegmenter(CLASSES, LengthRule(2, 128), start=len(prompt))
    req.stream.prev = prompt[-1]
    req.open_start = len(prompt)
    return req


def test_catch_up_after_skipped_rows_reports_every_end():
    prompt = [A, B, C, DOT]
    gen = [D, E, F, BANG, G, H, DOT, D]
    ids = np.array(prompt + gen)
    req = request(prompt)
    # the planner missed the first six generated tokens, then sees position 11
    ends = _feed(req, ids, len(prompt) + 7)
    assert ends == [8, 11]            # "d e f!" closes before " g", "g h." before " d"
    assert req.stream.n == len(ids)


def test_placeholder_token_is_fed_at_the_next_step():
    prompt = [A, B, C, DOT]
    ids = np.array(prompt + [D, E, F, BANG, -1, -1])
    req = request(prompt)
    assert _feed(req, ids, 8) == []    # position 8 is still a placeholder: nothing decided, nothing fed past it
    assert req.stream.n == 8
    ids[8] = G                          # the sampled token arrives
    assert _feed(req, ids, 9) == [8]    # the sentence closes one step late
    assert req.stream.n == 9
