"""The sentence index of one request in one layer: spans, per-KV-head semantic vectors, SnapKV retention.

Shapes: ``T`` tokens, ``S`` sentences, ``Hq`` query heads, ``Hk`` KV heads, ``D`` head dim, ``G = Hq // Hk``.
All functions are pure torch and run on whatever device the tensors are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def index_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the index keeps its features in: the model's when it is a 16-bit float (the keys the features
    average are stored in it too; half the bytes the selection reads every layer), else float32. Running sums
    stay float32."""
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32


def token_to_span(spans: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[T]`` index of the span holding each token (spans cover ``[0, n_tokens)`` contiguously)."""
    pos = torch.arange(n_tokens, device=spans.device)
    return torch.searchsorted(spans[:, 1].contiguous(), pos, right=True)


def snapkv_importance(obs_queries: torch.Tensor, keys: torch.Tensor, pool_kernel: int = 7) -> torch.Tensor:
    """SnapKV token importance per KV head.

    obs_queries: ``[W, Hq, D]`` post-RoPE queries of the last ``W`` prompt tokens.
    keys: ``[T, Hk, D]`` post-RoPE keys of the prompt.
    Returns ``[Hk, T]``: attention of the window queries (causal, softmax over keys) summed over the window,
    averaged over each KV head's query group, then average-pooled along tokens. Window tokens get ``+inf``
    (SnapKV always keeps the observation window).
    """
    w, hq, d = obs_queries.shape
    t, hk, _ = keys.shape
    g = hq // hk
    q = obs_queries.float().view(w, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * w, d)
    # keys as a strided [Hk, D, T] view and the scale in place: einsum copied the keys and the scaled logits were a
    # second [Hk, G, W, T] float32 tensor (a third of the transient memory; at 128k x 32 query heads, 0.5 GB)
    logits = torch.bmm(q, keys.float().permute(1, 2, 0)).view(hk, g, w, t).div_(d ** 0.5)    # [Hk, G, W, T]
    # causal: only the window's own keys can lie in a window query's future (a [W, W] corner, masked in place)
    future = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., t - w:].masked_fill_(future, float("-inf"))
    attn = logits.softmax(dim=-1).sum(dim=2).mean(dim=1)                  # [Hk, T]
    pooled = F.avg_pool1d(attn[:, None, :], pool_kernel, stride=1, padding=pool_kernel // 2,
                          count_include_pad=False)[:, 0]
    pooled[:, t - w:] = float("inf")
    return pooled


def retention_mask(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """``[Hk, T]`` bool: the ``keep`` most important tokens per KV head (all tokens if ``keep >= T``)."""
    hk, t = importance.shape
    if keep >= t:
        return torch.ones(hk, t, dtype=torch.bool, device=importance.device)
    top = importance.topk(keep, dim=-1).indices
    return torch.zeros(hk, t, dtype=torch.bool, device=importance.device).scatter_(1, top, True)


def sentence_centroids(keys: torch.Tensor, spans: torch.Tensor, retained: torch.Tensor | None = None,
                       keep_unretained: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean post-RoPE key of the retained tokens of each sentence, per KV head.

    keys ``[T, Hk, D]``, spans ``[S, 2]``, retained ``[Hk, T]`` bool or None (= all tokens).
    Returns (centroids ``[S, Hk, D]`` float32, valid ``[S, Hk]`` bool). A sentence with no retained token in a
    head falls back to the mean of all its keys (``keep_unretained``) or is marked invalid.
    """
    t, hk, d = keys.shape
    sid = token_to_span(spans, t)
    k = keys.float()
    all_sum = torch.zeros(len(spans), hk, d, device=keys.device).index_add_(0, sid, k)
    all_cnt = (spans[:, 1] - spans[:, 0]).clamp_min(1).to(k.dtype)[:, None]
    mean_all = all_sum / all_cnt[..., None]
    if retained is None:
        return mean_all, torch.ones(len(spans), hk, dtype=torch.bool, device=keys.device)
    m = retained.T.to(k.dtype)                                            # [T, Hk]
    r_sum = torch.zeros_like(all_sum).index_add_(0, sid, k * m[..., None])
    r_cnt = torch.zeros(len(spans), hk, device=keys.device).index_add_(0, sid, m)
    has = r_cnt > 0
    cent = torch.where(has[..., None], r_sum / r_cnt.clamp_min(1)[..., None], mean_all)
    valid = torch.ones_like(has) if keep_unretained else has
    return cent, valid


def page_bounds(keys: torch.Tensor, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page metadata: per span and KV head the element-wise min and max key, each ``[S, Hk, D]``."""
    t, hk, d = keys.shape
    sid = token_to_span(spans, t)[:, None, None].expand(t, hk, d)
    k = keys.float()
    kmin = torch.full((len(spans), hk, d), float("inf"), device=keys.device).scatter_reduce_(0, sid, k, "amin")
    kmax = torch.full((len(spans), hk, d), float("-inf"), device=keys.device).scatter_reduce_(0, sid, k, "amax")
    return kmin, kmax
