"""Quest baseline: fixed-size pages scored by the upper bound of ``q·k`` from their element-wise min / max key.

Its units are pages, not sentences, so a server runs either Quest or the sentence policies (per-request switches
stay within one kind of unit).
"""

from __future__ import annotations

import torch

from sentencekv_vllm.core.index import page_bounds
from sentencekv_vllm.core.selection import UnitFeatures
from sentencekv_vllm.policies.base import Policy, PolicyConfig, Tensors


class Quest(Policy):
    name = "quest"
    summary = "pages scored by their min/max key bound; its units are pages, so only on a `quest` server"
    units = "pages"
    slots = ("key_min", "key_max")
    open_slots = {"key_min": "amin", "key_max": "amax"}
    uses_query = True

    def build_units(self, keys: torch.Tensor, spans: torch.Tensor, obs: torch.Tensor | None,
                    cfg: PolicyConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        kmin, kmax = page_bounds(keys, spans)
        return {"key_min": kmin, "key_max": kmax}, torch.ones(len(spans), keys.shape[1], dtype=torch.bool,
                                                                device=keys.device)

    def close_open(self, open_rows: Tensors, count: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"key_min": open_rows["key_min"], "key_max": open_rows["key_max"]}

    def raw_score(self, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
        """Quest upper bound of q·k over a page: ``sum_d max(q_d * min_d, q_d * max_d)``."""
        assert feats.b is not None, "quest needs min and max page keys"
        q = query.float()[:, None]                                              # [R, 1, Hk, D]
        if feats.scratch and feats.a.dtype == feats.b.dtype == torch.float32:
            bound = torch.maximum(feats.a.mul_(q), feats.b.mul_(q), out=feats.a).sum(-1)
        else:
            bound = torch.maximum(q * feats.a.float(), q * feats.b.float()).sum(-1)  # [R, S, Hk]
        return bound.transpose(1, 2)
