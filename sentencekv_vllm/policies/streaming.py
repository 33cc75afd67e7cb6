"""StreamingLLM baseline: the attention sinks plus the most recent ``budget - sinks`` tokens."""

from __future__ import annotations

import torch

from sentencekv_vllm.core.selection import SelectionBatch, UnitFeatures
from sentencekv_vllm.policies.base import Policy, no_units


class Streaming(Policy):
    name = "streaming"
    summary = "sinks + last τ−sinks tokens"

    def allowed(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
                details: dict | None = None) -> tuple[SelectionBatch, torch.Tensor]:
        """No unit is taken; the recent window widens to fill the budget."""
        eff = SelectionBatch(batch.starts, batch.ends, batch.seq_lens, batch.budget, batch.sinks,
                             batch.budget - batch.sinks)
        return eff, no_units(batch, 1 if query is None else query.shape[1])
