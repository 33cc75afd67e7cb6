"""SentenceKV: sentences scored by the dot product of the decode query with their centroid.

Prefill: a sentence's centroid is the mean post-RoPE key of its SnapKV-retained tokens (``core/index.py``). Decode:
a generated sentence's centroid is the mean of all its keys, kept as a running key sum while it is open.
"""

from __future__ import annotations

import torch

from sentencekv_vllm import native
from sentencekv_vllm.core.index import retention_mask, sentence_centroids, snapkv_importance
from sentencekv_vllm.core.selection import UnitFeatures
from sentencekv_vllm.policies.base import Policy, PolicyConfig, Tensors


class SentenceKV(Policy):
    name = "sentencekv"
    summary = "sentences scored by the mean query · centroid of their SnapKV-retained keys"
    slots = ("centroid",)
    open_slots = {"key_sum": "sum"}
    uses_query = True
    dot_score = True

    def build_units(self, keys: torch.Tensor, spans: torch.Tensor, obs: torch.Tensor | None,
                    cfg: PolicyConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        retained = None
        keys = keys.float()     # once for both (16-bit caches: ~0.6 ms a layer at 7.5k tokens each time)
        if obs is not None:
            retained = retention_mask(snapkv_importance(obs, keys, cfg.pool_kernel), cfg.semantic_budget)
        centroids = native.sentence_centroids if native.usable(keys) else sentence_centroids    # the same
        cent, valid = centroids(keys, spans, retained, cfg.keep_unretained)
        return {"centroid": cent}, valid

    def close_open(self, open_rows: Tensors, count: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"centroid": open_rows["key_sum"] / count.view(-1, 1, 1)}

    def raw_score(self, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
        """Dot product of the (mean current-sentence) query with sentence centroids. ``[R, Hk, D]`` -> ``[R, Hk, S]``.

        Product + sum (not einsum/bmm) so a row's scores do not depend on what else is in the batch.
        """
        q = query.float()[:, None]
        prod = feats.a.mul_(q) if feats.scratch and feats.a.dtype == torch.float32 else q * feats.a.float()
        return prod.sum(-1).transpose(1, 2)
