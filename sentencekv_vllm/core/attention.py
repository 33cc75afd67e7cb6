"""Reference attention over a selection: exact softmax, the oracle for engine tests and the decode path itself.

Shapes: ``R`` rows (decode requests), ``Hq`` query heads, ``Hk`` KV heads, ``B`` gathered tokens per KV head.
"""

from __future__ import annotations

import torch


def gathered_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                       scale: float, details: dict | None = None) -> torch.Tensor:
    """Exact softmax attention of one query token per row over per-KV-head gathered tokens.

    query ``[R, Hq, D]``; keys / values ``[R, Hk, B, D]``; valid ``[R, Hk, B]`` bool (padding False).
    Returns ``[R, Hq, D]`` in the query's dtype; math in float32. ``details`` (optional) receives ``probs``
    ``[R, Hk, B]``: attention mass per gathered token, summed over each KV head's query group.

    Two batched float32 matmuls per (row, KV head), so no intermediate is larger than ``R x Hq x B`` (the scores);
    each (row, head) product is computed on its own with the same shapes whatever else the batch holds, so a request
    gets bit-identical results alone and inside a batch (tested). Padding sits after the selected tokens and
    contributes exact zeros.
    """
    r, hq, d = query.shape
    hk = keys.shape[1]
    q = query.float().view(r, hk, hq // hk, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale              # [R, Hk, G, B]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = logits.softmax(dim=-1)
    if details is not None:
        details["probs"] = probs.sum(2)
    out = torch.matmul(probs, values.float())                                      # [R, Hk, G, D]
    return out.reshape(r, hq, d).to(query.dtype)


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
