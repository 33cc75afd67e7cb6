"""Test oracles of the engine-free core: the slow, obvious forms the fast paths are held to (tests only).

* :class:`SentenceIndex` / :class:`RunningMean`: one request's index in one layer, and the open sentence's running
  mean, as plain objects (the engine keeps the same data as rows of pooled tensors, ``integration/state.py``);
* :func:`masked_attention` (exact softmax over a token mask) and :func:`gather_selected` (a mask as positions).

The authors' decode, also an oracle but served as a policy, is ``sentencekv_vllm/policies/reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sentencekv_vllm.core.attention import gathered_attention
from sentencekv_vllm.core.index import retention_mask, sentence_centroids, snapkv_importance


@dataclass
class SentenceIndex:
    """Index of one request in one layer (the engine keeps the same data in pooled tensors).

    spans ``[S, 2]``; centroids ``[S, Hk, D]``; valid ``[S, Hk]``.
    """

    spans: torch.Tensor
    centroids: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, keys: torch.Tensor, obs_queries: torch.Tensor | None, spans: torch.Tensor,
              semantic_budget: int, pool_kernel: int = 7, keep_unretained: bool = True) -> "SentenceIndex":
        """Batch build after the exact prefill (obs_queries None -> no retention, all tokens count)."""
        retained = None
        if obs_queries is not None:
            retained = retention_mask(snapkv_importance(obs_queries, keys, pool_kernel), semantic_budget)
        cent, valid = sentence_centroids(keys, spans, retained, keep_unretained)
        return cls(spans.clone(), cent, valid)

    def append(self, start: int, end: int, centroid: torch.Tensor) -> None:
        """Add a generated sentence ``[start, end)`` with its centroid ``[Hk, D]``."""
        span = torch.tensor([[start, end]], dtype=self.spans.dtype, device=self.spans.device)
        self.spans = torch.cat([self.spans, span])
        self.centroids = torch.cat([self.centroids, centroid.float()[None]])
        self.valid = torch.cat([self.valid, self.valid.new_ones(1, self.valid.shape[1])])


class RunningMean:
    """Running sum of per-token vectors of the open sentence (keys for centroids, queries for the decode query).

    The engine keeps one per request and layer as rows of a pooled tensor; this class is its reference.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def push(self, x: torch.Tensor) -> None:
        self.total = x.float().clone() if self.total is None else self.total + x.float()
        self.count += 1

    def mean(self) -> torch.Tensor:
        assert self.total is not None, "empty sentence"
        return self.total / self.count

    def reset(self) -> None:
        self.total, self.count = None, 0


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Same as :func:`gathered_attention` for one request over its whole context with a token mask.

    query ``[Hq, D]``; keys / values ``[T, Hk, D]``; mask ``[Hk, T]`` bool. Returns ``[Hq, D]``.
    """
    k = keys.permute(1, 0, 2)[None]
    v = values.permute(1, 0, 2)[None]
    return gathered_attention(query[None], k, v, mask[None], scale)[0]


def gather_selected(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the selected tokens, ``width`` per (row, KV head), ascending.

    mask ``[R, Hk, T]`` with at most ``width`` True per row/head. Returns (positions ``[R, Hk, width]`` long,
    valid ``[R, Hk, width]`` bool); padding positions are 0 and invalid.
    """
    t = mask.shape[-1]
    width = min(width, t)
    # stable sort puts selected (key 0) before unselected (key 1), keeping position order
    order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
    valid = mask.gather(-1, order)
    return order.masked_fill(~valid, 0), valid
