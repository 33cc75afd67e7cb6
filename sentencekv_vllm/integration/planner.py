"""Per-step planning, run once per step by the metadata builder (Python over rows, never over tokens).

It turns the scheduler's batch into a :class:`StepPlan` of small tensors that every layer's forward reuses:
which prompt queries to keep for SnapKV, which requests finish their prefill (index build), the decode
bookkeeping (running query/key sums, sentences that close), and which decode rows attend sparsely, grouped by
policy. Rows whose context is below ``sparse_from`` (the budget, or ``dense_below x budget``) or whose policy is
``full`` stay on the stock kernel; rows of a stateful policy (``reference``) always take its own path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sentencekv_vllm import native, policies
from sentencekv_vllm.config import PAGED_MIN_BLOCKS
from sentencekv_vllm.core.blocks import BlockPlan, head_split_tables, plan_blocks, recency_scores, select_blocks
from sentencekv_vllm.core.segmentation import spans_from_ends
from sentencekv_vllm.core.selection import PAD_POS, SelectionBatch
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.compat import RowInfo, model_dims, runner_rows
from sentencekv_vllm.integration.state import STATE, RequestState, new_stream
from sentencekv_vllm.integration.tier.host_reads import HostTables, host_tables, hot_sets_hold
from sentencekv_vllm.policies.base import TokenFeatures


@dataclass
class ObsCopy:
    req: RequestState
    src: torch.Tensor          # flat token indices in this step's batch
    dst_lo: int                # first window index written


@dataclass
class IndexBuild:
    """Build the prompt index of one request in every layer (its last prefill chunk runs this step)."""

    req: RequestState
    block_row: torch.Tensor    # [1, max_blocks]
    spans: torch.Tensor        # [S, 2]
    unit_slots: torch.Tensor   # [S]


@dataclass
class FoldRows:
    """The indexed decode rows whose token each layer folds into its open sentence's running statistics.

    Sentences that close at this step and the rows that start a new one are handled by the planner for every
    layer at once (:func:`_close_and_reset`), so a layer only adds its query and key (``UnitStore.fold_open``).
    """

    tok: torch.Tensor          # [Rd] flat token index
    slot: torch.Tensor         # [Rd] request slot
    rows: slice | None = None  # ``tok`` as a slice when contiguous (views instead of gathers)
    native: native.Folder | None = None   # the fold in one native call per layer (CPU, sum statistics only)


@dataclass
class CatchUp:
    """A decode row that starts folding at this step (it nears ``sparse_from``): the generated sentences it closed
    before, and its open sentence so far, get their statistics from the keys already in the paged cache.

    Why: a dense row needs no sentence features, so it skips the per-layer fold (SentenceKV then costs a dense row
    nothing per layer); its features are built once, if it gets near turning sparse. Queries are not cached, so the
    open sentence's query sum starts here; that sentence closes before the row turns sparse (no unit is longer than
    the margin), so no selection ever uses a partial query sum.
    """

    slot: int
    block_row: torch.Tensor    # [1, max_blocks]
    span: tuple[int, int]      # [lo, hi): the n cached positions to read (closed sentences, then the open one)
    seg: torch.Tensor          # [n] 0..P-1: closed sentence of each position, P: the open sentence
    unit_slots: torch.Tensor   # [P] unit-pool rows of the closed sentences
    count: torch.Tensor        # [P] float tokens in each closed sentence


@dataclass
class PagedGroup:
    """Block-granular attention of a sparse group (``core/blocks.py``) on the stock paged kernel."""

    plan: BlockPlan
    tables: torch.Tensor                # [R, Hk, NB+1] head-split block id of each logical block
    metadata: Any                       # stock metadata of the head-split batch (block table set per layer)
    blocks: torch.Tensor | None = None  # [R, Hk, W] logical blocks when they do not depend on the layer (streaming)
    valid: torch.Tensor | None = None   # [L, R, S, Hk] whether each head may take each unit, every layer (one
    #                                     gather; the torch path only: the native selector reads the store's masks)
    native: native.BlockSelector | None = None   # the selection in one native call per layer (CPU, dot scores)


@dataclass
class GroupTokens:
    """Token-level policy features of a group's rows (``RequestState.tokens``), padded per layer when used."""

    reqs: list[RequestState]
    prompt_lens: torch.Tensor  # [Rs]

    def layer(self, layer_idx: int) -> TokenFeatures:
        rows = [req.tokens[layer_idx] if req.tokens is not None else None for req in self.reqs]
        known = [t for t in rows if t is not None]
        hk, dev = STATE.store.dims[1], self.prompt_lens.device
        order = torch.full((len(rows), hk, max([t.shape[-1] for t in known], default=0)), -1, dtype=torch.long,
                           device=dev)
        for j, t in enumerate(rows):
            if t is not None:
                order[j, :, :t.shape[-1]] = t
        return TokenFeatures(order, self.prompt_lens)


@dataclass
class SparseGroup:
    policy: str
    tok: torch.Tensor          # [Rs]
    slot: torch.Tensor         # [Rs]
    q_count: torch.Tensor      # [Rs] float, tokens in the open sentence incl. this one
    batch: SelectionBatch
    unit_slots: torch.Tensor   # [Rs, S]
    unit_valid: torch.Tensor   # [Rs, S]
    block_table: torch.Tensor  # [Rs, max_blocks]
    width: int
    host: HostTables | None = None      # the rows' host-tier tables (two-tier memory, a row with host blocks)
    reqs: list[RequestState] = field(default_factory=list)                     # request of each row
    traced: list[tuple[int, RequestState, int]] = field(default_factory=list)  # (row, request, units) to trace
    trace_acc: tuple[torch.Tensor, ...] | None = None   # [Rs, S] hits, scores, attention mass (trace mode)
    paged: PagedGroup | None = None     # set when the group attends whole blocks (``attention`` config)
    tokens: GroupTokens | None = None   # token-level policies (SnapKV): the rows' prefill choice
    punct: list[bool] | None = None     # stateful policies: this step's token of each row is sentence-final
    rows: slice | None = None           # ``tok`` as a slice when contiguous (views instead of copies)


@dataclass
class DenseSubset:
    metadata: Any                       # the stock backend's metadata for that sub-batch
    rows: slice | None = None           # the rows' tokens when the rows are consecutive (views instead of copies)
    tok: torch.Tensor | None = None     # else their flat token indices


@dataclass
class StepPlan:
    obs: list[ObsCopy] = field(default_factory=list)
    index_builds: list[IndexBuild] = field(default_factory=list)
    catch_ups: list[CatchUp] = field(default_factory=list)
    fold: FoldRows | None = None
    sparse: list[SparseGroup] = field(default_factory=list)
    dense: DenseSubset | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def plan_step(builder: Any, cm: Any, base: Any) -> StepPlan:
    """``builder`` must offer ``subset_metadata(base, qsl, seq_lens, block_table, num_tokens)``."""
    t0 = time.perf_counter()
    STATE.begin_step()
    num_reqs = cm.num_reqs
    if STATE.store is None:     # reserved at start-up; reading the model config is not free (every step)
        STATE.ensure_store(*model_dims(STATE.vllm_config), cm.seq_lens.device)
    qsl = cm.query_start_loc_cpu.tolist()
    seq_lens = cm.seq_lens.cpu().tolist()
    plan = StepPlan()
    fold: dict[str, list] = {k: [] for k in ("tok", "slot", "reset", "close_rows", "close_units", "close_count")}
    sparse_rows: dict[tuple[str, bool], list[tuple[int, RequestState, int, int]]] = {}
    dense_rows: list[int] = []
    punct: dict[int, bool] = {}
    decode_rows = 0
    for i, row in enumerate(runner_rows(STATE.runner, num_reqs)):
        q0, q1, total = qsl[i], qsl[i + 1], seq_lens[i]
        ctx = total - (q1 - q0)
        req = _request_for(row, ctx)
        req.advance(total)
        if ctx < req.prompt_len:
            _plan_prefill(plan, req, row, i, q0, ctx, total, cm)
            dense_rows.append(i)
        elif q1 - q0 == 1 and req.indexed:
            decode_rows += 1
            policy = policies.get(req.cfg.policy)
            sparse = policy.stateful or (not policy.dense and total >= req.cfg.sparse_from)
            n_sent = _plan_decode(plan, fold, req, row, q0, total, sparse, cm.block_table_tensor[i:i + 1])
            if policy.stateful:
                punct[i] = _is_punct(int(row.token_ids[total - 1]))
            if sparse:
                sparse_rows.setdefault((policy.name, _row_paged(builder, req)), []).append((i, req, q0, n_sent))
            else:
                dense_rows.append(i)
        else:
            dense_rows.append(i)
    plan.fold = _close_and_reset(fold) if fold["tok"] else None
    if sparse_rows:
        plan.sparse = [g for (p, paged), rows in sparse_rows.items()
                       for g in _sparse_groups(builder, base, p, rows, seq_lens, cm, punct, paged)]
        plan.dense = _dense_subset(builder, base, dense_rows, qsl, cm) if dense_rows else None
    plan.stats = {"plan_s": time.perf_counter() - t0, "sparse_rows": sum(map(len, sparse_rows.values()))}
    metrics.observe_step(plan.stats["sparse_rows"], decode_rows)
    return plan


def _request_for(row: RowInfo, ctx: int) -> RequestState:
    """Known request continuing where it stopped, or a new / resumed-after-preemption one (state rebuilt).

    A request resumed after a preemption recomputes its prompt and the tokens generated so far in one dense
    prefill, so all of them are indexed as its "prompt" (the scheduler side keeps it dense for as long). A new
    request may start at ``ctx > 0`` after a prefix-cache hit (capped before the observation window); its index
    reads the cached blocks' keys like any others.
    """
    req = STATE.requests.get(row.req_id)
    if req is None or req.seen != ctx:
        req = STATE.new_request(row.req_id, row.extra_args, row.num_tokens, start=ctx)
    elif req.indexed and req.obs is not None:
        req.drop_window()
    return req


def _plan_prefill(plan: StepPlan, req: RequestState, row: RowInfo, i: int, q0: int, ctx: int, total: int,
                  cm: Any) -> None:
    p = req.prompt_len
    store = STATE.store
    assert store is not None
    w = req.window_len
    lo, hi = max(ctx, p - w), min(total, p)
    if hi > lo:
        req.capture_window(lo - (p - w), store.dims, store.device)
        plan.obs.append(ObsCopy(req, torch.arange(q0 + lo - ctx, q0 + hi - ctx), lo - (p - w)))
    if total < p:
        return
    segmenter = STATE.segmenter(STATE.unit_kind)
    prompt_ids = row.token_ids[:p]
    t0 = time.perf_counter()
    spans = spans_from_ends(segmenter.segment(prompt_ids.tolist()))
    metrics.observe_segmentation(time.perf_counter() - t0, len(spans))
    slots = store.alloc_units(len(spans))
    punct = [_is_punct(t) for t in prompt_ids.tolist()] if policies.get(req.cfg.policy).stateful else None
    req.finish_prefill([tuple(s) for s in spans.tolist()], slots, new_stream(req, segmenter, int(prompt_ids[-1])),
                       punct)
    plan.index_builds.append(IndexBuild(req, cm.block_table_tensor[i:i + 1], spans.to(store.device),
                                  torch.tensor(slots, device=store.device)))


def _plan_decode(plan: StepPlan, fold: dict[str, list], req: RequestState, row: RowInfo, q0: int, total: int,
                 sparse: bool, block_row: torch.Tensor) -> int:
    """Feed the generated tokens the segmenter has not seen yet; returns the number of closed units after this step.

    The stream catches up from its own position, so a decode row that skipped this path (a multi-token row, a
    step before the index existed) cannot desynchronise it. Under async scheduling the newest sampled token is
    still a placeholder (``-1``) in the runner's token row; it is fed at the next step, so a sentence may close
    one step late (its centroid then holds that token too).

    A row folds its token into the running statistics (every layer) only from ``max_len + 2`` tokens before it
    turns sparse (always with the host tier, whose spills may free the blocks a catch-up would read); before that
    its sentences close without features, which are built from the cache when it starts folding
    (:class:`CatchUp`). No unit is longer than ``max_len``, so the sentence open when the row turns sparse started
    after folding did: its query sum is whole and the features are those the fold would have made.
    """
    pos = total - 1
    was_folding = req.folding
    ends = _feed(req, row.token_ids, pos)
    for end in ends:
        unit = STATE.store.alloc_units(1)[0]
        if req.trace is not None:
            req.trace.close(req.open_start, end, req.cfg.budget, req.trace_pairs)
        if was_folding:
            fold["close_rows"].append(len(fold["tok"]))
            fold["close_units"].append(unit)
            fold["close_count"].append(float(max(1, end - req.open_start)))
        req.close_sentence(end, unit)
    if not _folds(req, total, sparse):
        return len(req.units)
    if not was_folding:
        _start_folding(plan, req, pos, block_row)
    fold["tok"].append(q0)
    fold["slot"].append(req.slot)
    # a sentence closed one step late (async scheduling) leaves this step's token first in the next one
    fold["reset"].append(pos == req.open_start or bool(ends))
    return len(req.units)


def _folds(req: RequestState, total: int, sparse: bool) -> bool:
    """Whether a decode row folds its token at this step (see :func:`_plan_decode`)."""
    if req.folding or sparse or STATE.host is not None:
        return True
    return not policies.get(req.cfg.policy).dense and total + req.stream.max_len + 2 >= req.cfg.sparse_from


def _start_folding(plan: StepPlan, req: RequestState, pos: int, block_row: torch.Tensor) -> None:
    """The row folds from this step on; what it generated before gets its statistics from the cache."""
    pending = req.units[req.unfolded:]
    lo = pending[0][0] if pending else req.open_start
    req.start_folding()
    if pos <= lo:
        return
    store = STATE.store
    dev = store.device
    slots = req.unit_slots[len(req.unit_slots) - len(pending):]
    lengths = [e - s for s, e in pending] + [pos - req.open_start]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if slots:
        store.valid[:, slots] = True        # built by this step's forward, before any layer selects
    plan.catch_ups.append(CatchUp(
        req.slot, block_row, (lo, pos), seg.to(dev), torch.tensor(slots, device=dev, dtype=torch.long),
        torch.tensor([float(max(1, n)) for n in lengths[:-1]], device=dev)))


def _feed(req: RequestState, token_ids: Any, pos: int) -> list[int]:
    """Sentence ends decided by the known tokens up to ``pos`` (stops at the first placeholder)."""
    ends: list[int] = []
    stream = req.stream
    while stream.n <= pos:
        token = int(token_ids[stream.n])
        if token < 0:
            break
        ends += [e for e in stream.push(token) if e > req.open_start]
    return ends


def _is_punct(token: int) -> bool:
    """The reference code's sentence boundary: the token's own text ends a sentence (placeholders and ids past the
    tokenizer's vocabulary never do)."""
    table = STATE.punctuation()
    return 0 <= token < len(table) and bool(table[token])


def _close_and_reset(fold: dict[str, list]) -> FoldRows:
    """Once per step, every layer at once: the sentences closing now get their features from the open units'
    statistics (before this step's token is added: it starts the next sentence), and the rows starting a new
    sentence reset their statistics; the forward then only folds this step's token in, one op per layer."""
    store = STATE.store
    dev = store.device
    slot = torch.tensor(fold["slot"], device=dev)
    if fold["close_rows"]:
        closing = slot[torch.tensor(fold["close_rows"], device=dev)]
        units = torch.tensor(fold["close_units"], device=dev, dtype=torch.long)
        count = torch.tensor(fold["close_count"], device=dev, dtype=torch.float32)
        open_rows = store.open_rows(closing)
        for policy in policies.indexers(STATE.units):
            for name, value in policy.close_open(open_rows, count).items():
                store.set_units(name, slice(None), units, value)
        store.valid[:, units] = True
    reset = [s for s, r in zip(fold["slot"], fold["reset"], strict=True) if r]
    if reset:
        store.reset_open(torch.tensor(reset, device=dev))
    tok = torch.tensor(fold["tok"], device=dev)
    folder = None
    if len(store.open) <= 1 and set(store.open_reduce.values()) <= {"sum"} and native.usable(slot):
        folder = native.Folder(tok, slot, store.qsum, next(iter(store.open.values()), None))
    return FoldRows(tok=tok, slot=slot, rows=_as_slice(fold["tok"]), native=folder)


def _as_slice(toks: list[int]) -> slice | None:
    """Flat token indices as a slice when they are consecutive (layers then take views instead of gathers)."""
    return slice(toks[0], toks[0] + len(toks)) if toks == list(range(toks[0], toks[0] + len(toks))) else None


def _sparse_groups(builder: Any, base: Any, policy: str, rows: list[tuple[int, RequestState, int, int]],
                   seq_lens: list[int], cm: Any, punct: dict[int, bool], paged: bool) -> list[SparseGroup]:
    """The rows of one policy and decode path as one group; with the host tier, rows whose hot set cannot hold
    their selected blocks leave a paged group for an exact one (a row's path never depends on the other rows)."""
    group = _sparse_group(builder, base, policy, rows, seq_lens, cm, punct, paged)
    if group.paged is None or group.host is None:
        return [group]
    block_size = STATE.vllm_config.cache_config.block_size
    holds = hot_sets_hold(group.paged.plan, group.reqs, STATE.hot, STATE.cfg.sinks, block_size)
    if all(holds):
        return [group]
    keep = [row for row, ok in zip(rows, holds, strict=True) if ok]
    spill = [row for row, ok in zip(rows, holds, strict=True) if not ok]
    return ([_sparse_group(builder, base, policy, keep, seq_lens, cm, punct, True)] if keep else []) + \
        [_sparse_group(builder, base, policy, spill, seq_lens, cm, punct, False)]


def _sparse_group(builder: Any, base: Any, policy: str, rows: list[tuple[int, RequestState, int, int]],
                  seq_lens: list[int], cm: Any, punct: dict[int, bool], paged: bool) -> SparseGroup:
    """``punct``: batch row -> this step's token is sentence-final (rows of stateful policies); ``paged``: the
    group attends whole blocks (:func:`_row_paged`)."""
    dev = STATE.store.device
    n_units = max(1, max(n for *_, n in rows))
    r = len(rows)
    starts = torch.full((r, n_units), PAD_POS, dtype=torch.long)
    ends = starts.clone()
    slots = torch.zeros(r, n_units, dtype=torch.long)
    valid = torch.zeros(r, n_units, dtype=torch.bool)
    for j, (_, req, _, n) in enumerate(rows):
        s, e, u = req.unit_tensors()
        starts[j, :n], ends[j, :n], slots[j, :n], valid[j, :n] = s, e, u, True
    idx = [i for i, *_ in rows]
    reqs = [req for _, req, *_ in rows]
    totals = torch.tensor([seq_lens[i] for i in idx])
    budgets = torch.tensor([req.cfg.budget for req in reqs])
    cfg = STATE.cfg
    tail = _tail_lengths(reqs, totals, budgets)
    batch = SelectionBatch.make(starts.to(dev), ends.to(dev), totals.to(dev), budgets.to(dev), cfg.sinks,
                                tail.to(dev))
    traced = [(j, req, n) for j, (_, req, _, n) in enumerate(rows) if req.trace is not None]
    group = SparseGroup(
        policy=policy, tok=torch.tensor([q0 for _, _, q0, _ in rows], device=dev),
        slot=torch.tensor([req.slot for req in reqs], device=dev),
        q_count=(totals - torch.tensor([req.open_start for req in reqs])).clamp(min=1).float().to(dev),
        batch=batch, unit_slots=slots.to(dev), unit_valid=valid.to(dev),
        block_table=cm.block_table_tensor[torch.tensor(idx, device=dev)],
        width=int(min(budgets.max(), totals.max())), reqs=reqs, traced=traced)
    group.host = host_tables(reqs, group.block_table, STATE.store.dims[1])
    if policies.get(policy).token_level:
        group.tokens = GroupTokens(reqs, torch.tensor([req.prompt_len for req in reqs], device=dev))
    if policies.get(policy).stateful:
        group.punct = [punct[i] for i in idx]
    if paged:
        group.paged = _paged_group(builder, base, policy, group, tail.to(dev))
        group.rows = _as_slice([q0 for _, _, q0, _ in rows])
    return group


def _tail_lengths(reqs: list[RequestState], totals: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Always-attended tokens at the end of each row: the recent window, or the whole open (generated, not yet
    closed) sentence when it is longer, since only closed sentences can be selected; capped by the budget."""
    cfg = STATE.cfg
    open_len = totals - torch.tensor([req.open_start for req in reqs])
    return torch.minimum(open_len.clamp(min=cfg.recent), budgets - cfg.sinks)


def _row_paged(builder: Any, req: RequestState) -> bool:
    """Whether a sparse row attends whole blocks with the stock kernel (``attention`` in the config; see README):
    decided per row, from its own budget and policy, so that what else is batched cannot change its output.
    Traced rows take the exact path (the trace reports attention mass per token)."""
    mode = STATE.cfg.attention
    if mode == "exact" or not getattr(builder, "supports_paged_sparse", False) or req.trace is not None:
        return False
    if not policies.get(req.cfg.policy).paged:
        return False
    block_size = STATE.vllm_config.cache_config.block_size
    return mode == "paged" or req.cfg.budget >= PAGED_MIN_BLOCKS * block_size


def _paged_group(builder: Any, base: Any, policy: str, g: SparseGroup, tail: torch.Tensor) -> PagedGroup:
    """Block plan, and the stock metadata of the head-split batch: each (row, KV head) one sequence of
    ``Hq / Hk`` query heads over its selected blocks (same token count for every head and layer)."""
    b = g.batch
    block_size = STATE.vllm_config.cache_config.block_size
    planner = native.plan_blocks if native.usable(b.seq_lens) else plan_blocks    # the same plan
    plan = planner(b.starts, b.ends, g.unit_valid, b.seq_lens, b.budget, STATE.cfg.sinks, b.seq_lens - tail,
                   block_size)
    _, hk, hq, _ = STATE.store.dims
    seq = plan.seq_lens.repeat_interleave(hk).to(torch.int32)
    qsl = torch.arange(len(seq) + 1, dtype=torch.int32, device=seq.device)
    md = builder.subset_metadata(base, qsl, seq, g.block_table, len(seq), heads=(hq // hk, 1))
    blocks = select_blocks(recency_scores(plan, hk), plan) if policy == "streaming" else None
    valid = selector = None
    tables = head_split_tables(g.block_table, hk, plan.trash)
    if blocks is None:
        store = STATE.store
        if policies.get(policy).dot_score and native.usable(tables):
            # the host tier maps logical blocks through the hot sets itself
            selector = native.BlockSelector(plan, g.unit_slots, g.slot, tables if g.host is None else None, hk,
                                            store.units[policies.get(policy).slots[0]], store.qsum, store.valid,
                                            g.tok)
        else:     # the unit masks of every layer in one gather (per layer: a view)
            valid = store.valid.index_select(1, g.unit_slots.reshape(-1)).view(-1, *g.unit_slots.shape, hk)
    return PagedGroup(plan, tables, md, blocks, valid, selector)


def _dense_subset(builder: Any, base: Any, rows: list[int], qsl: list[int], cm: Any) -> DenseSubset:
    dev = cm.seq_lens.device
    lens = torch.tensor([qsl[i + 1] - qsl[i] for i in rows])
    sub_qsl = torch.zeros(len(rows) + 1, dtype=cm.query_start_loc.dtype)
    sub_qsl[1:] = lens.cumsum(0)
    idx = torch.tensor(rows, device=dev)
    md = builder.subset_metadata(base, sub_qsl.to(dev), cm.seq_lens[idx], cm.block_table_tensor[idx],
                                 int(sub_qsl[-1]))
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return DenseSubset(metadata=md, rows=slice(qsl[rows[0]], qsl[rows[-1] + 1]))
    return DenseSubset(metadata=md, tok=torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in rows]).to(dev))
