"""The authors' SentenceKV decode, step for step, for one request and one layer (pure torch, batch 1).

Written from the behaviour of the public reference implementation (eager attention path) and DESIGN.md; the
served policy (``sentencekv.py``) deviates from it on purpose where the README says so. The engine serves it as the
policy ``reference`` (:class:`Reference`; server ``policy: reference`` or per request
``vllm_xargs.sentencekv_policy: reference``): the worker keeps one :class:`ReferenceState` per request and layer and
calls :func:`prefill` / :func:`decode_step` themselves, so the engine's choice *is* this code's. What it does, in the
reference's terms:

* **Prefill** (per *query* head, the reference's cache is GQA-expanded): the last ``window`` queries attend the whole
  prompt (causal inside the window, softmax in float32); the attention they pay to the *prefix* (everything before
  the window) is summed over the window and **max**-pooled (``kernel``, padding ``kernel // 2``) over the prefix
  only; the ``semantic_budget - window`` best prefix tokens (ascending positions) plus the window form the
  compressed cache, the rest is discarded.
* **Sentences**: boundaries after punctuation tokens; a sentence's vector per query head is the mean key of its
  tokens in the compressed cache (zero, and no token to take, when none survived). Its token list is capped at
  ``max(100, 2 * C // S + 50)`` entries (``C`` compressed length, ``S`` sentences), as in the reference.
* **Decode**: each token joins the compressed cache. A generated punctuation token closes the open sentence (vector
  = mean of all its keys; its token list is dropped if longer than the cap). When the open sentence holds at most
  ``length_threshold`` tokens (the first step, a closing token, the first token after a boundary) the step attends
  the whole compressed cache. Otherwise the step attends the first ``sinks`` and the last ``recent`` *entries of
  the compressed cache*, plus, per query head, tokens of sentences in descending ``q · vector`` order (``q`` = mean
  query of the open sentence) whose cache index lies strictly between ``sinks`` and ``C - recent``, up to
  ``budget - sinks - recent`` tokens (the last sentence truncated).

Positions are the tokens' original positions (the reference keeps absolute RoPE positions), so a decode step's
choice is directly comparable with the engine's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from sentencekv_vllm.policies.base import Policy, PolicyConfig


@dataclass
class ReferenceState:
    """One layer of one request: the compressed cache and the sentence table, per query head."""

    cache_pos: torch.Tensor          # [Hq, C] original position of each compressed-cache entry
    keys: torch.Tensor               # [Hq, C, D] keys of those entries (GQA-expanded)
    vectors: torch.Tensor            # [Hq, S, D] sentence vectors
    tokens: torch.Tensor             # [Hq, S, M] compressed-cache indices of each sentence's tokens (-1 pads)
    lengths: torch.Tensor            # [Hq, S] tokens per sentence (after the cap)
    open_q: list[torch.Tensor] = field(default_factory=list)   # queries [Hq, D] of the open sentence
    open_idx: list[int] = field(default_factory=list)          # their compressed-cache indices


def prefill(queries: torch.Tensor, keys: torch.Tensor, punct: list[bool], semantic_budget: int, window: int = 32,
            kernel: int = 7) -> ReferenceState:
    """keys ``[T, Hk, D]`` post-RoPE; queries ``[W', Hq, D]``: the last prompt queries (at least ``min(window, T)``
    of them; only the last ``window`` are read); ``punct[t]``: token ``t`` is sentence-final."""
    t = keys.shape[0]
    hq, d = queries.shape[1:]
    k = keys.float().repeat_interleave(hq // keys.shape[1], dim=1).transpose(0, 1)        # [Hq, T, D]
    if t < window:
        keep = torch.arange(t).expand(hq, t)
    else:
        q = queries.float()[-window:].transpose(0, 1)                                     # [Hq, W, D]
        logits = q @ k.transpose(1, 2) / math.sqrt(d)                                     # [Hq, W, T]
        future = torch.arange(window)[None, :] > torch.arange(window)[:, None]
        logits[:, :, t - window:] = logits[:, :, t - window:].masked_fill(future, torch.finfo(torch.float32).min)
        summed = logits.softmax(-1)[..., :t - window].sum(1)                              # [Hq, T - W]
        pooled = F.max_pool1d(summed[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        n = min(max(semantic_budget - window, 1), pooled.shape[-1])
        top = pooled.topk(n, dim=-1).indices.sort(dim=-1).values
        keep = torch.cat([top, torch.arange(t - window, t).expand(hq, window)], dim=-1)
    ranges = [0] + [i + 1 for i, p in enumerate(punct) if p]
    if ranges[-1] < t:
        ranges.append(t)
    n_sent = len(ranges) - 1
    ck = k.gather(1, keep[..., None].expand(-1, -1, d))
    sid = (torch.searchsorted(torch.tensor(ranges), keep, right=True) - 1).clamp(0, n_sent - 1)    # [Hq, C]
    cap = max(100, (keep.shape[1] // n_sent) * 2 + 50) if n_sent else keep.shape[1]
    vectors = torch.zeros(hq, n_sent, d)
    tokens = torch.full((hq, n_sent, cap), -1, dtype=torch.long)
    lengths = torch.zeros(hq, n_sent, dtype=torch.long)
    for h in range(hq):
        for s in range(n_sent):
            idx = (sid[h] == s).nonzero().flatten()
            if len(idx):
                vectors[h, s] = ck[h, idx].mean(0)
            tokens[h, s, :min(len(idx), cap)] = idx[:cap]
            lengths[h, s] = min(len(idx), cap)
    return ReferenceState(keep, ck, vectors, tokens, lengths)


def decode_step(state: ReferenceState, query: torch.Tensor, key: torch.Tensor, position: int, is_punct: bool,
                budget: int, sinks: int = 32, recent: int = 32, length_threshold: int = 1) -> list[list[int]]:
    """One generated token (query ``[Hq, D]``, key ``[Hk, D]`` at ``position``): update the state, return the
    original positions each query head attends, ascending."""
    hq, d = query.shape
    k = key.float().repeat_interleave(hq // key.shape[0], dim=0)
    state.cache_pos = torch.cat([state.cache_pos, torch.full((hq, 1), position)], dim=1)
    state.keys = torch.cat([state.keys, k[:, None]], dim=1)
    c = state.cache_pos.shape[1]
    state.open_q.append(query.float())
    state.open_idx.append(c - 1)
    if is_punct:
        _close_sentence(state)
    local = set(range(min(sinks, c))) | set(range(max(0, c - recent), c))
    if len(state.open_q) <= length_threshold:
        chosen = [set(range(c)) for _ in range(hq)]
    else:
        q = torch.stack(state.open_q).mean(0)
        chosen = [local | _sentence_tokens(state, h, q[h], sinks, c - recent, budget - sinks - recent)
                  for h in range(hq)]
    return [sorted(state.cache_pos[h, i].item() for i in chosen[h] | local) for h in range(hq)]


def _close_sentence(state: ReferenceState) -> None:
    idx = torch.tensor(state.open_idx)
    cap = state.tokens.shape[-1]
    hq = state.keys.shape[0]
    row = torch.full((hq, 1, cap), -1, dtype=torch.long)
    if len(idx) <= cap:
        row[:, 0, :len(idx)] = idx
    state.vectors = torch.cat([state.vectors, state.keys[:, idx].mean(1)[:, None]], dim=1)
    state.tokens = torch.cat([state.tokens, row], dim=1)
    state.lengths = torch.cat([state.lengths, torch.full((hq, 1), min(len(idx), cap))], dim=1)
    state.open_q, state.open_idx = [], []


def _sentence_tokens(state: ReferenceState, h: int, q: torch.Tensor, left: int, right: int, room: int) -> set[int]:
    """Cache indices of sentence tokens in score order, strictly inside ``(left, right)``, at most ``room``."""
    order = (state.vectors[h] @ q).argsort(descending=True, stable=True)
    taken: list[int] = []
    for s in order.tolist():
        for i in state.tokens[h, s, :state.lengths[h, s]].tolist():
            if left < i < right:
                taken.append(i)
    return set(taken[:max(room, 0)])


class Reference(Policy):
    """The authors' decode as a served policy: per request and layer a :class:`ReferenceState` (compressed
    ``semantic_budget`` cache per *query* head, punctuation sentences), stepped by :func:`decode_step` for every
    generated token; each query head attends exactly the positions it returns.

    A fidelity tool, not a serving mode: Python per request, layer and head, and the state holds GQA-expanded
    float32 keys of the compressed cache (``L x Hq x (semantic_budget + generated) x D x 4`` bytes per request,
    outside vLLM's KV budget, in host memory). It reads no unit feature, so it runs per request on any sentence
    server; never with ``offload: host`` (it reads the device cache only).
    """

    name = "reference"
    summary = ("the authors' SentenceKV step for step (`policies/reference.py`): per query head, compressed "
               "semantic_budget cache, punctuation sentences; slow, for fidelity studies")
    paged = False
    stateful = True
    #: the reference's ``length_threshold``: an open sentence this short attends the whole compressed cache
    length_threshold: ClassVar[int] = 1

    def init_state(self, keys: torch.Tensor, obs: torch.Tensor, punct: list[bool],
                   cfg: PolicyConfig) -> ReferenceState:
        """One layer of one request after its prefill: keys ``[T, Hk, D]``, obs ``[W, Hq, D]`` the captured window
        queries (``W = 0``: none were captured, nothing to score with, so nothing is evicted)."""
        window = cfg.obs_window if obs.shape[0] else keys.shape[0] + 1
        # the oracle builds its index tensors on the CPU; its state stays there (it is read by Python anyway)
        return prefill(obs.cpu(), keys.cpu(), punct, cfg.semantic_budget, window, cfg.pool_kernel)

    def step(self, state: ReferenceState, query: torch.Tensor, key: torch.Tensor, position: int, punct: bool,
             cfg: PolicyConfig) -> list[list[int]]:
        """Add this decode token (query ``[Hq, D]``, key ``[Hk, D]``) and return each query head's positions."""
        return decode_step(state, query.cpu(), key.cpu(), position, punct, cfg.budget, cfg.sinks, cfg.recent,
                           self.length_threshold)
