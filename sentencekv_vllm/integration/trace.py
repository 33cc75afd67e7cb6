"""Retrieval trace (opt-in: ``trace_requests: N``): which prompt sentences each generated sentence used.

Worker side: sparse steps add, per request and unit, how many (layer, KV head) pairs selected it and the sum of
their scores; when a generated sentence closes, its top units become a record. When the runner drops the request
(finish/abort), the trace is written as ``<dir>/<request id>.json`` and only the newest N files are kept.

Channel to the API server: that directory (``$SENTENCEKV_TRACE_DIR``, created by the API server at start-up and
inherited by the engine processes). It is bounded (N files, each at most ``MAX_UNITS`` sentences and
``MAX_RECORDS`` generated-sentence records) and costs nothing when tracing is off.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TRACE_DIR_ENV = "SENTENCEKV_TRACE_DIR"
MAX_UNITS = 4096
MAX_RECORDS = 256
TOP_UNITS = 32


def trace_dir() -> Path:
    path = os.environ.get(TRACE_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="sentencekv-trace-")
        os.environ[TRACE_DIR_ENV] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


@dataclass
class RequestTrace:
    """Per unit, for the open generated sentence: selections (layer x KV-head pairs), summed selection scores and
    the attention mass its selected tokens received (summed over query heads and layers)."""

    acc: torch.Tensor = field(default_factory=lambda: torch.zeros(3, 0))   # rows: hits, score sum, mass
    steps: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, hits: torch.Tensor, score_sum: torch.Tensor, mass: torch.Tensor) -> None:
        n = hits.shape[0]
        if self.acc.shape[1] < n:
            self.acc = torch.cat([self.acc, torch.zeros(3, n - self.acc.shape[1])], dim=1)
        self.acc[:, :n] += torch.stack([hits, score_sum, mass]).float().cpu()
        self.steps += 1

    def close(self, start: int, end: int, budget: int, pairs_per_step: int) -> None:
        """The open generated sentence ``[start, end)`` ended: keep the units that drew the most attention."""
        hits, score_sum, mass = self.acc
        if self.steps and len(self.records) < MAX_RECORDS:
            total = float(mass.sum()) or 1.0
            top = torch.argsort(mass, descending=True, stable=True)[:TOP_UNITS]
            retrieved = [{"sentence": int(u), "attention": float(mass[u]) / total, "hits": int(hits[u]),
                          "share": float(hits[u]) / (self.steps * pairs_per_step),
                          "mean_score": float(score_sum[u] / hits[u])}
                         for u in top.tolist() if hits[u] > 0]
            self.records.append({"start": start, "end": end, "steps": self.steps, "budget": budget,
                                 "retrieved": retrieved})
        self.acc.zero_()
        self.steps = 0


def write(req_id: str, req: Any, token_ids: list[int], tokenizer: Any, keep: int, block_size: int) -> None:
    """Persist a finished request's trace and trim the ring to ``keep`` files."""
    trace: RequestTrace = req.trace
    if req.open_start < len(token_ids):
        trace.close(req.open_start, len(token_ids), req.cfg.budget, trace_pairs(req))
    units = req.units[:MAX_UNITS]
    host = set(req.host_map)

    def tier(start: int, end: int) -> str:
        blocks = set(range(start // block_size, (end - 1) // block_size + 1))
        return "host" if blocks <= host else "device" if not blocks & host else "mixed"

    doc = {
        "request_id": req_id, "policy": req.cfg.policy, "budget": req.cfg.budget, "prompt_len": req.prompt_len,
        "sentences": [{"id": i, "start": s, "end": e, "text": tokenizer.decode(token_ids[s:e]), "tier": tier(s, e),
                       "generated": s >= req.prompt_len} for i, (s, e) in enumerate(units)],
        "generated": [{**r, "text": tokenizer.decode(token_ids[r["start"]:r["end"]])} for r in trace.records],
    }
    directory = trace_dir()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in req_id)
    tmp = directory / f".{safe}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.rename(directory / f"{safe}.json")
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def trace_pairs(req: Any) -> int:
    """(layer, KV head) pairs per step; set by the impl once the model's shape is known."""
    return getattr(req, "trace_pairs", 1)
