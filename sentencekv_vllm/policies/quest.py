"""Quest baseline: fixed-size pages scored by the upper bound of ``q·k`` from their element-wise min / max key.

Its units are pages, not sentences, so a server runs either Quest or the sentence policies (per-request switches
stay within one kind of unit).
"""

from __future__ import annotations

import torch

from sentencekv_vllm.core.index import page_bounds
from sentencekv_vllm.core.selection import NEG_INF, UnitFeatures
from sentencekv_vllm.policies.base import Policy, PolicyConfig, Tensors


class Quest(Policy):
    name = "quest"
    summary = "pages scored by their min/max key bound; its units are pages, so only on a `quest` server"
    units = "pages"
    slots = ("key_min", "key_max")
    open_slots = ("key_min", "key_max")
    uses_query = True

    def build_units(self, keys: torch.Tensor, spans: torch.Tensor, obs: torch.Tensor | None,
                    cfg: PolicyConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        kmin, kmax = page_bounds(keys, spans)
        return {"key_min": kmin, "key_max": kmax}, torch.ones(len(spans), keys.shape[1], dtype=torch.bool,
                                                                device=keys.device)

    def update_open(self, open_rows: Tensors, key: torch.Tensor, reset: torch.Tensor) -> dict[str, torch.Tensor]:
        r = reset[:, None, None]
        return {"key_min": torch.where(r, key, torch.minimum(open_rows["key_min"], key)),
                "key_max": torch.where(r, key, torch.maximum(open_rows["key_max"], key))}

    def close_open(self, open_rows: Tensors, count: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"key_min": open_rows["key_min"], "key_max": open_rows["key_max"]}

    def score(self, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
        """Quest upper bound of q·k over a page: ``sum_d max(q_d * min_d, q_d * max_d)``."""
        assert feats.b is not None, "quest needs min and max page keys"
        q = query.float()[:, None]                                              # [R, 1, Hk, D]
        bound = torch.maximum(q * feats.a.float(), q * feats.b.float()).sum(-1)  # [R, S, Hk]
        return bound.transpose(1, 2).masked_fill(~feats.valid.transpose(1, 2), NEG_INF)
