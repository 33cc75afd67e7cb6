"""Per-worker SentenceKV state: requests, and the pooled tensors that hold every request's index.

Layout of the pools (``L`` layers, ``Hk``/``Hq`` KV/query heads, ``D`` head dim), all on the model's device:

* unit pool, ``[L, P, Hk, D]`` per feature slot: one row per sentence (or Quest page) of every live request; the
  slots are those of the policies sharing the server's units (``policies.pool_slots``: ``centroid``, or
  ``key_min`` / ``key_max``), ``valid`` ``[L, P, Hk]`` whether a head may select it. A request owns a list of unit
  slots, like a block table; slots return to a free list on finish/abort.
* running statistics, ``[L, max_num_seqs, Hk, D]``: per request slot, the sum of the open sentence's queries (over
  each KV head's query group; decode query) and the open unit's key statistics (``key_sum``, which becomes its
  centroid once it closes; Quest: ``key_min`` / ``key_max``).
* token-level policies (SnapKV) keep their prefill choice per request (``RequestState.tokens``).

Centroids are a side pool rather than KV blocks: they are tiny (``S x Hk x D`` per layer), need float32 and are
rewritten per layer in the forward. One unit costs ``L x Hk x D x 4`` bytes (23 KB for SmolLM2), about 5% of the
bf16 KV bytes of the tokens it summarises at 20-token sentences. The unit pool is allocated once at start-up for
every token the KV pools can hold and taken off vLLM's KV memory (``memory.py``); exported as
``sentencekv_index_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from sentencekv_vllm import policies
from sentencekv_vllm.config import SentenceKVConfig, resolve_request_or_server
from sentencekv_vllm.core.index import index_dtype
from sentencekv_vllm.core.segmentation import IncrementalSegmenter
from sentencekv_vllm.integration import trace
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.tier.host_pool import apply_spills
from sentencekv_vllm.integration.tier.hotset import HotSets
from sentencekv_vllm.integration.tier.messages import Spill
from sentencekv_vllm.integration.trace import RequestTrace
from sentencekv_vllm.policies.base import OPEN_INIT

_INITIAL_UNITS = 1024        # a store built before the worker reserved the index (tests, the layer benchmark)
_GROWTH = 1.25               # past the reservation: small steps (old and new are alive together while copying)


@dataclass
class RequestState:
    req_id: str
    cfg: SentenceKVConfig
    slot: int
    prompt_len: int
    seen: int                                   # positions whose KV is written (next expected context start)
    obs: torch.Tensor | None = None             # [L, W, Hq, D] last-W prompt queries, during prefill only
    obs_lo: int | None = None                   # first captured window index
    units: list[tuple[int, int]] = field(default_factory=list)
    unit_slots: list[int] = field(default_factory=list)
    indexed: bool = False                       # prompt index built (all layers)
    stream: Any = None                          # incremental segmenter over generated tokens
    open_start: int = 0                         # first position of the open (generated) sentence
    folding: bool = False                       # decode tokens fold into the running statistics (planner)
    unfolded: int = 0                           # units from here on closed unfolded (features built at catch-up)
    host_map: dict[int, int] = field(default_factory=dict)   # logical block -> host slot (two-tier memory)
    trace: RequestTrace | None = None           # retrieval trace (trace_requests > 0 or sentencekv_trace)
    trace_pairs: int = 1                        # (layer, KV head) pairs per step, for the trace's shares
    tokens: torch.Tensor | None = None          # [L, Hk, K] token-level policy features (Policy.build_tokens)
    layer_states: list[Any] | None = None       # [L] a stateful policy's own decode state (``reference``)
    punct: list[bool] | None = None             # stateful policies: prompt tokens that are sentence-final
    _tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def unit_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(starts, ends, slots) as long tensors; cached until a unit is added."""
        if self._tensors is None:
            spans = torch.tensor(self.units, dtype=torch.long).view(-1, 2)
            self._tensors = (spans[:, 0], spans[:, 1], torch.tensor(self.unit_slots, dtype=torch.long))
        return self._tensors

    def add_units(self, spans: list[tuple[int, int]], slots: list[int]) -> None:
        self.units.extend(spans)
        self.unit_slots.extend(slots)
        self._tensors = None

    # -- the request's own changes (the planner and the host tier call these; nothing sets fields one by one) --

    def advance(self, total: int) -> None:
        """This step writes the KV of positions up to ``total``."""
        self.seen = total

    @property
    def window_len(self) -> int:
        """Prompt queries in SnapKV's observation window (the last ``obs_window``, at most the prompt)."""
        return min(self.cfg.obs_window, self.prompt_len)

    def capture_window(self, lo: int, dims: tuple[int, int, int, int], device: torch.device) -> None:
        """This step's prefill chunk holds window query ``lo`` onwards (SnapKV's observation window; the forward
        writes them into ``obs`` ``[L, W, Hq, D]``, allocated at the first chunk that reaches the window)."""
        n_layers, _, n_heads, head_dim = dims
        if self.obs is None:
            self.obs = torch.zeros(n_layers, self.window_len, n_heads, head_dim, dtype=torch.float32, device=device)
        self.obs_lo = lo if self.obs_lo is None else min(self.obs_lo, lo)

    def window(self, layer_idx: int) -> torch.Tensor | None:
        """The captured window queries ``[W', Hq, D]`` of one layer, or None when none were captured."""
        if self.obs is None or self.obs_lo is None or self.obs_lo >= self.obs.shape[1]:
            return None
        return self.obs[layer_idx, self.obs_lo:]

    def set_layer_index(self, layer_idx: int, num_layers: int, tokens: torch.Tensor | None,
                        layer_state: Any = None) -> None:
        """The request's own prompt features of one layer, if its policy has some: token-level features
        (``Policy.build_tokens``) and a stateful policy's decode state (``Policy.init_state``)."""
        if tokens is not None:
            if self.tokens is None:
                self.tokens = tokens.new_full((num_layers, *tokens.shape), -1)
            self.tokens[layer_idx] = tokens
        if layer_state is not None:
            if self.layer_states is None:
                self.layer_states = [None] * num_layers
            self.layer_states[layer_idx] = layer_state

    def drop_window(self) -> None:
        """The prompt index was built by the previous step's forward: the captured window queries are done."""
        self.obs = None

    def finish_prefill(self, spans: list[tuple[int, int]], slots: list[int], stream: Any,
                       punct: list[bool] | None) -> None:
        """The last prompt chunk runs this step: the prompt's units join the index (built by this step's forward),
        generated tokens are segmented from here by ``stream``; ``punct`` for stateful policies."""
        self.add_units(spans, slots)
        self.punct = punct
        self.indexed = True
        self.stream = stream
        self.open_start = self.prompt_len
        self.unfolded = len(self.units)

    def start_folding(self) -> None:
        """This step's token is the first folded; every unit so far has its features (built by this step's
        catch-up). The sentence open now closes before the row turns sparse, so no selection reads its partial
        query sum (``planner._plan_decode``)."""
        self.folding, self.unfolded = True, len(self.units)

    def close_sentence(self, end: int, unit: int) -> None:
        """The open generated sentence ends before ``end`` and becomes unit-pool row ``unit``."""
        self.add_units([(self.open_start, end)], [unit])
        self.open_start = end

    def spilled(self, logical: int, slot: int) -> None:
        """Logical block ``logical`` now has a host copy in ``slot`` (a kept device block's hot-set entry is
        pooled: ``WorkerState.hot``)."""
        self.host_map[logical] = slot


class UnitStore:
    """The pooled tensors, allocated at start-up for ``capacity`` units (``memory.index_capacity``); should text
    with very short sentences outgrow that, grown by 25% by the planner between steps, never inside a forward.

    ``units[slot]`` ``[L, P, Hk, D]``: the unit features of the server's policies (``sentencekv``: ``centroid``;
    ``quest``: ``key_min`` / ``key_max``), ``valid`` ``[L, P, Hk]``. ``open[slot]`` ``[L, max_reqs, Hk, D]``: running
    statistics of each request's open unit (``key_sum``; ``key_min`` / ``key_max``), ``qsum`` the open sentence's
    query sum over each KV head's query group (selection scores a KV head with its group's mean query).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, num_heads: int, head_dim: int, max_reqs: int,
                 device: torch.device, unit_slots: tuple[str, ...] = (),
                 open_slots: Mapping[str, str] | None = None, capacity: int = _INITIAL_UNITS,
                 unit_dtype: torch.dtype = torch.float32) -> None:
        self.dims = (num_layers, num_kv_heads, num_heads, head_dim)
        self.device = device
        f32 = dict(dtype=torch.float32, device=device)
        self.units = {name: torch.zeros(num_layers, capacity, num_kv_heads, head_dim, dtype=unit_dtype, device=device)
                      for name in unit_slots}
        self.valid = torch.zeros(num_layers, capacity, num_kv_heads, dtype=torch.bool, device=device)
        self.qsum = torch.zeros(num_layers, max_reqs, num_kv_heads, head_dim, **f32)
        # open slot -> its reduction (``Policy.open_slots``: ``sum`` / ``amin`` / ``amax``)
        self.open_reduce = dict(open_slots or {})
        self.open = {name: torch.zeros_like(self.qsum) for name in self.open_reduce}
        self._scratch: dict[str, torch.Tensor] = {}
        self.free_units = list(range(capacity - 1, -1, -1))
        self.free_slots = list(range(max_reqs - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def nbytes(self) -> int:
        tensors = [*self.units.values(), self.valid, self.qsum, *self.open.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def unit_rows(self, layer_idx: int, unit_slots: torch.Tensor, names: tuple[str, ...],
                  scratch: bool = False) -> dict[str, torch.Tensor]:
        """``{slot: features}`` ``[*unit_slots.shape, Hk, D]`` of the given unit-pool rows of one layer
        (``index_select``: a fraction of advanced indexing's per-call cost on the decode hot path). ``scratch``:
        gathered into this store's reused workspace (valid until the next call; the caller may overwrite it)."""
        flat = unit_slots.reshape(-1)
        shape = (*unit_slots.shape, *self.dims[1::2])
        out = {}
        for name in names:
            src = self.units[name][layer_idx]
            if src.dtype != torch.float32:     # half-precision index: scored in float32
                out[name] = src.index_select(0, flat).float().view(shape)
                continue
            buf = self._workspace(name, flat.numel() * src[0].numel()) if scratch else None
            rows = torch.index_select(src, 0, flat, out=buf.view(-1, *src.shape[1:])) if scratch else \
                src.index_select(0, flat)
            out[name] = rows.view(shape)
        return out

    def _workspace(self, name: str, numel: int) -> torch.Tensor:
        """A reused float32 buffer of at least ``numel`` elements (grown by 1.5x, never shrunk)."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, int(1.5 * (0 if buf is None else buf.numel()))), dtype=torch.float32,
                              device=self.device)
            self._scratch[name] = buf
        return buf[:numel]

    def set_units(self, name: str, layers: int | slice, unit_slots: torch.Tensor, value: torch.Tensor) -> None:
        """Write features (float32, as the policies compute them) into the pool, in its dtype."""
        pool = self.units[name]
        pool[layers, unit_slots] = value.to(pool.dtype)

    def valid_rows(self, layer_idx: int, unit_slots: torch.Tensor) -> torch.Tensor:
        """``[*unit_slots.shape, Hk]`` whether each KV head may select the given units (one layer)."""
        return self.valid[layer_idx].index_select(0, unit_slots.reshape(-1)).view(*unit_slots.shape, self.dims[1])

    def query_sums(self, layer_idx: int, slots: torch.Tensor) -> torch.Tensor:
        """``[R, Hk, D]`` open-sentence query sums of the given request slots (one layer)."""
        return self.qsum[layer_idx].index_select(0, slots)

    def open_rows(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{slot: running statistics}`` ``[L, R, Hk, D]`` of the given request slots, every layer."""
        return {name: t[:, slots] for name, t in self.open.items()}

    def reset_open(self, slots: torch.Tensor) -> None:
        """Every layer, once per step: the given request slots start a new open unit with this step's token."""
        self.qsum[:, slots] = 0.0
        for name, t in self.open.items():
            t[:, slots] = OPEN_INIT[self.open_reduce[name]]

    def fold_open(self, layer_idx: int, slots: torch.Tensor, query_sums: torch.Tensor, keys: torch.Tensor) -> None:
        """One layer: add this step's tokens to their open units (query group sums ``[R, Hk, D]``, keys
        ``[R, Hk, D]`` float32), one indexed op per statistic; ``slots`` are distinct within a step."""
        self.qsum[layer_idx].index_add_(0, slots, query_sums)
        for name, t in self.open.items():
            how = self.open_reduce[name]
            if how == "sum":
                t[layer_idx].index_add_(0, slots, keys)
            else:
                t[layer_idx].index_reduce_(0, slots, keys, how)

    def catch_up(self, layer_idx: int, slot: int, keys: torch.Tensor, seg: torch.Tensor, unit_slots: torch.Tensor,
                 count: torch.Tensor, indexers: list[Any]) -> None:
        """One layer: the running statistics of ``P`` closed units and of the open one (``seg`` ``[n]``: unit of
        each key, ``P`` = open), reduced from their keys ``[n, Hk, D]`` float32 as the fold would have; the
        closed ones become unit features (``Policy.close_open``), the open one continues in request ``slot``,
        whose query sum starts empty (the caller folds this step's query next)."""
        p = unit_slots.numel()
        stats = {}
        for name, how in self.open_reduce.items():
            out = torch.full((p + 1, *keys.shape[1:]), OPEN_INIT[how], dtype=torch.float32, device=keys.device)
            stats[name] = out.index_add_(0, seg, keys) if how == "sum" else out.index_reduce_(0, seg, keys, how)
            self.open[name][layer_idx, slot] = stats[name][p]
        self.qsum[layer_idx, slot] = 0.0
        if p:
            closed = {name: t[:p] for name, t in stats.items()}
            for policy in indexers:
                for name, value in policy.close_open(closed, count).items():
                    self.set_units(name, layer_idx, unit_slots, value)

    def alloc_slot(self) -> int:
        """A request slot (row of the running sums). Live requests never exceed ``max_num_seqs`` (preempted ones
        are released, ``attach_runner``); should that ever break, the rows grow (between steps, like the unit
        pool) with a warning instead of failing the engine."""
        if not self.free_slots:
            old = self.qsum.shape[1]
            get_logger(__name__).warning("SentenceKV: more requests with state than max_num_seqs (%d); growing "
                                         "the request-slot pool", old)
            self.qsum = _grow_rows(self.qsum, 2 * old)
            self.open = {name: _grow_rows(t, 2 * old) for name, t in self.open.items()}
            self.free_slots.extend(range(2 * old - 1, old - 1, -1))
        return self.free_slots.pop()

    def alloc_units(self, n: int) -> list[int]:
        while len(self.free_units) < n:
            self._grow()
        return [self.free_units.pop() for _ in range(n)]

    def free(self, units: list[int]) -> None:
        if units:
            self.valid[:, units] = False
            self.free_units.extend(units)

    def _grow(self) -> None:
        old = self.capacity
        new = max(old + 64, int(old * _GROWTH))
        get_logger(__name__).warning("SentenceKV: the sentence index outgrew its start-up reservation (%d units); "
                                     "growing it to %d outside vLLM's memory budget. Sentences are shorter than "
                                     "index_tokens_per_unit on average: lower it to reserve more.", old, new)
        self.units = {name: _grow_rows(t, new) for name, t in self.units.items()}
        self.valid = _grow_rows(self.valid, new)
        self.free_units.extend(range(new - 1, old - 1, -1))


def _grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with dim 1 zero-extended to ``rows``."""
    new = torch.zeros((t.shape[0], rows, *t.shape[2:]), dtype=t.dtype, device=t.device)
    new[:, :t.shape[1]] = t
    return new


class WorkerState:
    """Everything SentenceKV keeps in one worker process (one per device)."""

    def __init__(self) -> None:
        self.runner: Any = None
        self.vllm_config: Any = None
        self.cfg = SentenceKVConfig()
        self.requests: dict[str, RequestState] = {}
        self.store: UnitStore | None = None
        self.host: Any = None                   # tier.host_pool.HostPool when offload == "host"
        self.hot: HotSets | None = None         # every request's hot set, a row per request slot (host tier)
        self.step = 0                           # engine steps planned (hot-set recency)
        self._segmenters: dict[str, Any] = {}

    @property
    def units(self) -> str:
        """The units every request's index is built on (those of the server's policy)."""
        return policies.get(self.cfg.policy).units

    @property
    def unit_kind(self) -> str:
        """The segmenter of the server's units: sentences by the configured segmentation, or the units' own name."""
        return self.cfg.segmentation if self.units == "sentences" else self.units

    def configure(self, runner: Any, vllm_config: Any) -> None:
        self.runner, self.vllm_config = runner, vllm_config
        self.cfg = SentenceKVConfig.from_additional_config(vllm_config.additional_config)

    def reserve_index(self, units: int) -> None:
        """The worker allocated the KV cache: allocate the index for ``units`` units now, before vLLM captures CUDA
        graphs (``memory.IndexReservingWorker`` took their bytes off the KV memory and sized them)."""
        from sentencekv_vllm.integration.compat import model_device, model_dims

        self.ensure_store(*model_dims(self.vllm_config), model_device(self.runner), capacity=units)

    def ensure_store(self, num_layers: int, num_kv_heads: int, num_heads: int, head_dim: int,
                     device: torch.device, capacity: int = _INITIAL_UNITS) -> UnitStore:
        if self.store is None:
            max_reqs = self.vllm_config.scheduler_config.max_num_seqs
            unit_slots, _ = policies.pool_slots(self.units)
            self.store = UnitStore(num_layers, num_kv_heads, num_heads, head_dim, max_reqs, device, unit_slots,
                                   policies.open_reductions(self.units), capacity,
                                   index_dtype(self.vllm_config.model_config.dtype))
        return self.store

    def new_request(self, req_id: str, extra_args: dict[str, Any] | None, prompt_len: int,
                    start: int) -> RequestState:
        self.release(req_id)
        assert self.store is not None
        state = RequestState(req_id, resolve_request_or_server(self.cfg, extra_args), self.store.alloc_slot(),
                             prompt_len, seen=start)
        if trace.wanted(self.cfg, extra_args):
            state.trace = RequestTrace()
            state.trace_pairs = self.store.dims[0] * self.store.dims[1]
        self.requests[req_id] = state
        return state

    def release(self, req_id: str, token_ids: list[int] | None = None) -> None:
        """Free a request's units and slot (finish, abort, preemption); safe to call twice. With ``token_ids``
        (the runner dropped the request) a traced request's trace joins the in-memory ring first."""
        state = self.requests.pop(req_id, None)
        if state is None or self.store is None:
            return
        if state.trace is not None and token_ids and state.indexed:
            block_size = self.vllm_config.cache_config.block_size
            trace.finish(req_id, state, token_ids, self.cfg, block_size, self.tokenizer)
        self.store.free(state.unit_slots)
        self.store.free_slots.append(state.slot)
        if self.hot is not None:
            self.hot.clear(state.slot)

    def begin_step(self) -> int:
        """The planner starts a step (the hot set's recency clock)."""
        self.step += 1
        return self.step

    def attach_host(self, host: Any) -> None:
        """The connector built the worker's host pool (``offload: host``)."""
        self.host = host

    def apply_spills(self, spills: list[Spill]) -> None:
        """Connector metadata of this step, applied before the forward (``tier.host_pool.apply_spills``). A released
        request (finish, abort, preemption) needs nothing here: its map goes with its state."""
        if spills:
            assert self.host is not None, "host tier not initialised"
            apply_spills(self.host, spills, self.requests, self._keep_hot)

    def _keep_hot(self, req: RequestState, block: int, logical: int) -> None:
        """A spilled block stays allocated on the device and joins ``req``'s hot set (the pool is made at the
        first kept block)."""
        if self.hot is None:
            assert self.store is not None
            self.hot = HotSets(self.store.dims[0], self.store.qsum.shape[1], self.store.device, self.store.dims[1])
        self.hot.add(req.slot, block, logical)

    def gauges(self) -> dict[str, int]:
        """Values the worker's metrics snapshot reads (``metrics.snapshot_worker`` takes values, not state)."""
        out = {"requests": len(self.requests)}
        if self.store is not None:
            out.update(units=self.store.capacity - len(self.store.free_units), index_bytes=self.store.nbytes())
        if self.host is not None:
            out["swap_out_bytes"] = self.host.bytes_out
        return out

    def tokenizer(self) -> Any:
        if "tokenizer" not in self._segmenters:
            self._segmenters["tokenizer"] = _load_tokenizer(self.vllm_config)
        return self._segmenters["tokenizer"]

    def punctuation(self) -> torch.Tensor:
        """``[vocab]`` bool: the token's text ends a sentence on its own (no look-ahead, no length rule), the
        reference code's boundary test (``policies/reference.py``)."""
        if "punct_table" not in self._segmenters:
            from sentencekv_vllm.core.segmentation import TokenClasses

            classes = TokenClasses.from_tokenizer(self.tokenizer())
            self._segmenters["punct_table"] = classes.weak_end | classes.strong_end
        return self._segmenters["punct_table"]

    def segmenter(self, kind: str) -> Any:
        """Lazily built segmenters (the token table decodes the whole vocabulary once)."""
        if kind not in self._segmenters:
            self._segmenters[kind] = _make_segmenter(kind, self.cfg, self.vllm_config)
        return self._segmenters[kind]


def _make_segmenter(kind: str, cfg: SentenceKVConfig, vllm_config: Any) -> Any:
    from sentencekv_vllm.core.segmentation import (
        FixedLengthSegmenter,
        LengthRule,
        PunctSegmenter,
        SpacySegmenter,
        TokenClasses,
    )

    if kind == "pages":
        return FixedLengthSegmenter(cfg.quest_page_size)
    tokenizer = STATE.tokenizer()
    rule = LengthRule(cfg.min_sentence_len, cfg.max_sentence_len)
    if kind == "spacy":
        return SpacySegmenter(tokenizer, rule, cfg.spacy_model)
    return PunctSegmenter(TokenClasses.from_tokenizer(tokenizer), rule)


def _load_tokenizer(vllm_config: Any) -> Any:
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    return AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                         trust_remote_code=mc.trust_remote_code)


STATE = WorkerState()


def attach_runner(runner: Any, vllm_config: Any) -> None:
    """Called by the SentenceKV worker once its model runner exists. A request's state is freed when the runner
    drops it (finish, abort) and when the scheduler preempts it: a preempted request restarts from position 0
    with a fresh state, and until then it must not hold one of the ``max_num_seqs`` request slots."""
    from sentencekv_vllm.integration.compat import on_request_removed, on_requests_preempted

    STATE.configure(runner, vllm_config)
    on_request_removed(runner, STATE.release)
    on_requests_preempted(runner, STATE.release)
    # at start-up, not in the first request's prefill: loading the tokenizer and decoding its vocabulary into the
    # segmenter's token table took 0.55 s of a fresh server's first TTFT (SmolLM2, 2-core CPU)
    STATE.segmenter(STATE.unit_kind)


def new_stream(state: RequestState, segmenter: Any, last_prompt_token: int) -> IncrementalSegmenter:
    """Incremental segmenter for generated tokens, primed with the last prompt token (for look-ahead)."""
    stream = segmenter.stream(start=state.prompt_len)
    if isinstance(stream, IncrementalSegmenter):
        stream.prev = int(last_prompt_token)
    return stream
