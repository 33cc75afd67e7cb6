"""Retrieval traces: which prompt sentences each generated sentence used.

Which requests: every request when ``trace_requests: N > 0`` (the newest N finished traces are kept), and any
request that asks with ``vllm_xargs.sentencekv_trace: true`` while ``trace_per_request`` is on (the default; a
request may also opt out with ``false``). Tracing costs nothing for requests that are not traced.

Worker side: sparse steps add, per request and unit, how many (layer, KV head) pairs selected it, the sum of their
scores and the attention mass their tokens received (:meth:`RequestTrace.add`, called by the impl at the last
layer); when a generated sentence closes, its top units become a record (:meth:`RequestTrace.close`, called by the
planner). When the runner drops the request (finish/abort), :func:`finish` freezes the trace into a
:class:`FinishedTrace` in the worker's in-memory :data:`RING`.

Channel to the API server: vLLM's own RPC between the frontend and the engine. The inspector (an endpoint plugin
in the API server) calls ``engine_client.collective_rpc("sentencekv_traces", ...)``, which EngineCore runs between
steps on each worker (:class:`TraceRPC`, mixed into the SentenceKV workers). Traces hold token ids, not text: the
API server decodes them with its own tokenizer (:func:`document`), off the engine loop. Nothing is written to disk
unless an operator names a directory (``trace_dir``, or ``$SENTENCEKV_TRACE_DIR``).

Bounds: the ring holds at most ``trace_requests`` (<= 256) traces, or :data:`OPT_IN_RING` when only per-request
traces are on; one trace holds at most :data:`MAX_UNITS` sentences and :data:`MAX_TOKENS` token ids of text,
:data:`MAX_RECORDS` generated-sentence records of :data:`TOP_UNITS` sentences each. A longer prompt keeps the
sentences its answer drew from (and their neighbours) and reports how many it left out.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from sentencekv_vllm.config import request_flag
from sentencekv_vllm.integration.log import get_logger

TRACE_DIR_ENV = "SENTENCEKV_TRACE_DIR"
RPC_METHOD = "sentencekv_traces"
MAX_UNITS = 4096
MAX_TOKENS = 65536
MAX_RECORDS = 256
TOP_UNITS = 32
OPT_IN_RING = 8
NEIGHBOURS = 2          # sentences kept on each side of a retrieved one when a long prompt is cut


def trace_dir(directory: str | None = None) -> Path | None:
    """The directory an operator asked traces to be written to (``trace_dir``, else ``$SENTENCEKV_TRACE_DIR``),
    created if missing; ``None`` (the default) means memory only."""
    path = directory or os.environ.get(TRACE_DIR_ENV)
    if not path:
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def wanted(cfg: Any, extra_args: Mapping[str, Any] | None) -> bool:
    """Trace this request? Its own ``sentencekv_trace`` flag if the server allows per-request traces, else the
    server-wide ``trace_requests``."""
    flag = request_flag((extra_args or {}).get("sentencekv_trace"))
    if flag is not None and cfg.trace_per_request:
        return flag
    return cfg.trace_requests > 0


def ring_size(cfg: Any) -> int:
    if cfg.trace_requests > 0:
        return cfg.trace_requests
    return OPT_IN_RING if cfg.trace_per_request else 0


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


@dataclass(frozen=True)
class FinishedTrace:
    """A finished request's trace as plain data (msgpack-able for the RPC): kept sentences as ``[id, start, end,
    tier]``, records, and the token ids of the kept spans only (``[start, ids]`` pieces)."""

    request_id: str
    policy: str
    budget: int
    prompt_len: int
    total_sentences: int
    sentences: list[list[Any]]
    records: list[dict[str, Any]]
    pieces: list[list[Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "policy": self.policy, "budget": self.budget,
                "prompt_len": self.prompt_len, "total_sentences": self.total_sentences,
                "sentences": self.sentences, "records": self.records,
                "pieces": [[start, list(ids)] for start, ids in self.pieces]}


def snapshot(req_id: str, req: Any, token_ids: list[int], block_size: int) -> FinishedTrace:
    """Freeze ``req``'s trace: close the open sentence, keep a bounded set of sentences and their tokens."""
    trace: RequestTrace = req.trace
    if req.open_start < len(token_ids):
        trace.close(req.open_start, len(token_ids), req.cfg.budget, trace_pairs(req))
    keep = select_units(req.units, trace.records)
    host = set(req.host_map)
    sentences = [[u, *req.units[u], _tier(*req.units[u], host, block_size)] for u in keep]
    kept = set(keep)
    records = [{**r, "retrieved": [x for x in r["retrieved"] if x["sentence"] in kept]} for r in trace.records]
    spans = [tuple(req.units[u]) for u in keep] + [(r["start"], r["end"]) for r in records]
    return FinishedTrace(req_id, req.cfg.policy, req.cfg.budget, req.prompt_len, len(req.units), sentences,
                         records, _pieces(token_ids, spans))


def select_units(units: list[tuple[int, int]], records: list[dict[str, Any]]) -> list[int]:
    """All units if they fit :data:`MAX_UNITS` / :data:`MAX_TOKENS`; else the retrieved ones (most attention
    first), their neighbours, then the rest in order, as far as the bounds allow. Sorted ids."""
    total_tokens = sum(e - s for s, e in units)
    if len(units) <= MAX_UNITS and total_tokens <= MAX_TOKENS:
        return list(range(len(units)))
    mass: dict[int, float] = {}
    for record in records:
        for r in record["retrieved"]:
            if r["sentence"] < len(units):
                mass[r["sentence"]] = mass.get(r["sentence"], 0.0) + r["attention"]
    retrieved = sorted(mass, key=lambda u: -mass[u])
    near = [v for u in retrieved for v in range(u - NEIGHBOURS, u + NEIGHBOURS + 1) if 0 <= v < len(units)]
    chosen: dict[int, None] = {}
    tokens = 0
    for u in (*retrieved, *near, *range(len(units))):
        if len(chosen) >= MAX_UNITS:
            break
        if u in chosen or tokens + units[u][1] - units[u][0] > MAX_TOKENS:
            continue
        chosen[u] = None
        tokens += units[u][1] - units[u][0]
    return sorted(chosen)


def _tier(start: int, end: int, host: set[int], block_size: int) -> str:
    blocks = set(range(start // block_size, (end - 1) // block_size + 1))
    return "host" if blocks <= host else "device" if not blocks & host else "mixed"


def _pieces(token_ids: list[int], spans: list[tuple[int, int]]) -> list[list[Any]]:
    """Token ids of the union of ``spans``, as ``[start, array]`` pieces sorted by start."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [[s, array("i", token_ids[s:e])] for s, e in merged]


def document(wire: Mapping[str, Any], decode: Callable[[list[int]], str], top: int = TOP_UNITS) -> dict[str, Any]:
    """The inspector's JSON for one trace: sentences with text, and per generated sentence its ``top`` retrieved
    sentences. ``omitted_sentences`` counts the sentences a long prompt left out (their ids are skipped)."""
    starts = [p[0] for p in wire["pieces"]]

    def text(start: int, end: int) -> str:
        i = bisect.bisect_right(starts, start) - 1
        if i < 0:
            return ""
        first, ids = wire["pieces"][i]
        return decode(list(ids[start - first:end - first]))

    prompt_len = wire["prompt_len"]
    sentences = [{"id": u, "start": s, "end": e, "text": text(s, e), "tier": tier, "generated": s >= prompt_len}
                 for u, s, e, tier in wire["sentences"]]
    generated = [{**r, "retrieved": r["retrieved"][:top], "text": text(r["start"], r["end"])}
                 for r in wire["records"]]
    return {"request_id": wire["request_id"], "policy": wire["policy"], "budget": wire["budget"],
            "prompt_len": prompt_len, "total_sentences": wire["total_sentences"],
            "omitted_sentences": wire["total_sentences"] - len(sentences), "sentences": sentences,
            "generated": generated}


class TraceRing:
    """The newest finished traces of this worker, bounded; guarded by a lock (RPCs and releases may run on
    different threads with some executors)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, FinishedTrace] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: FinishedTrace, capacity: int) -> None:
        with self._lock:
            self._items.pop(item.request_id, None)
            self._items[item.request_id] = item
            while len(self._items) > max(capacity, 0):
                self._items.popitem(last=False)

    def ids(self) -> list[str]:
        with self._lock:
            return list(reversed(self._items))

    def find(self, request_id: str) -> FinishedTrace | None:
        """Exact id, else the newest id starting with it (the OpenAI response id is a prefix of vLLM's)."""
        with self._lock:
            if request_id in self._items:
                return self._items[request_id]
            return next((t for rid, t in reversed(self._items.items()) if rid.startswith(request_id)), None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


RING = TraceRing()


def finish(req_id: str, req: Any, token_ids: list[int], cfg: Any, block_size: int,
           tokenizer: Callable[[], Any]) -> None:
    """The runner dropped a traced request: keep its trace in :data:`RING`; write it to the operator's directory
    too if one was named (blocking, but only then)."""
    item = snapshot(req_id, req, token_ids, block_size)
    capacity = ring_size(cfg) or OPT_IN_RING
    RING.add(item, capacity)
    directory = trace_dir(cfg.trace_dir)
    if directory is not None:
        try:
            _write(directory, item, tokenizer().decode, capacity)
        except OSError as err:
            get_logger(__name__).warning("SentenceKV: could not write the trace of %s to %s: %s", req_id,
                                         directory, err)


def _write(directory: Path, item: FinishedTrace, decode: Callable[[list[int]], str], keep: int) -> None:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item.request_id)
    tmp = directory / f".{safe}.tmp"
    tmp.write_text(json.dumps(document(item.to_wire(), decode)))
    tmp.rename(directory / f"{safe}.json")
    files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def serve(request_id: str | None = None) -> dict[str, Any] | None:
    """The RPC's answer: ``{"requests": [ids, newest first]}``, or one trace in wire form (``None`` if unknown)."""
    if request_id is None:
        return {"requests": RING.ids()}
    item = RING.find(request_id)
    return None if item is None else item.to_wire()


class TraceRPC:
    """Mixed into the SentenceKV workers so that EngineCore's ``collective_rpc("sentencekv_traces", ...)`` (sent
    by the inspector in the API server through vLLM's engine client) reaches this worker's :data:`RING`."""

    def sentencekv_traces(self, request_id: str | None = None) -> dict[str, Any] | None:
        return serve(request_id)


def trace_pairs(req: Any) -> int:
    """(layer, KV head) pairs per step; set by the impl once the model's shape is known."""
    return getattr(req, "trace_pairs", 1)
