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
