"""FULL: stock attention over the whole context (the engine never takes the sparse path for it)."""

from __future__ import annotations

import torch

from sentencekv_vllm.core.selection import SelectionBatch, UnitFeatures
from sentencekv_vllm.policies.base import Policy, no_units


class Full(Policy):
    name = "full"
    summary = "stock attention"
    dense = True

    def allowed(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
                details: dict | None = None) -> tuple[SelectionBatch, torch.Tensor]:
        """Every token: the recent window is the whole context (used by the reference mask only)."""
        eff = SelectionBatch(batch.starts, batch.ends, batch.seq_lens, batch.seq_lens, batch.seq_lens * 0,
                             batch.seq_lens)
        return eff, no_units(batch, 1 if query is None else query.shape[1])
