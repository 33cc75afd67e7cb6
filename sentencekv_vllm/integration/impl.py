"""Backend-agnostic SentenceKV attention: a mixin placed before a stock ``AttentionImpl`` (CPU or FlashAttention).

Per layer: capture SnapKV window queries, build the prompt index on the last prefill chunk (keys read back from
the paged cache through the probed block layout), keep running statistics of the open sentence, then attention.
What is built, kept and scored is the policies' business (``sentencekv_vllm/policies/``); this module only moves
their tensors in and out of the pools:
the stock kernel (``super().forward``) for prefill and short rows, exact softmax over the selected tokens
(gathered from the paged cache) for sparse decode rows.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sentencekv_vllm import policies
from sentencekv_vllm.core.attention import gathered_attention
from sentencekv_vllm.core.blocks import block_scores, physical_tables, select_blocks, with_trash_column
from sentencekv_vllm.core.selection import UnitFeatures
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.compat import layer_index
from sentencekv_vllm.integration.kv_layout import BlockLayout
from sentencekv_vllm.integration.planner import CatchUp, DenseSubset, IndexBuild, SparseGroup, StepPlan, plan_step
from sentencekv_vllm.integration.state import STATE, UnitStore
from sentencekv_vllm.integration.tier.host_reads import make_resident, read_host_tokens

_LAYOUTS: dict[tuple, BlockLayout] = {}


def _heads_contiguous(x: torch.Tensor, head_size: int) -> bool:
    """A token's heads lie back to back in ``x`` (``[T, H, D]`` or ``[T, H * D]``)."""
    st = x.stride()
    return st[-1] == 1 and (x.dim() == 2 or st[-2] == head_size)


class SentenceKVBackendMixin:
    """Static facts shared by the CPU and CUDA backends (placed before the stock backend class)."""

    @staticmethod
    def get_name() -> str:
        return "SENTENCEKV"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def customize_spec(cls, spec):
        from sentencekv_vllm.integration.tier.kv_spec import offload_spec

        return offload_spec(spec, STATE.cfg)


class SentenceKVBuilderMixin:
    """Stock metadata plus the step plan, as the backend's typed subclass of the stock metadata
    (``metadata_cls``, a dataclass with a ``plan`` field); sub-batch metadata for the dense rows (placed before the
    stock builder)."""

    metadata_cls: type

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(self.prefix_len(common_prefix_len), common_attn_metadata, fast_build)
        plan = plan_step(self, common_attn_metadata, base) if STATE.runner is not None else None
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
        return self.metadata_cls(**fields, plan=plan)

    def prefix_len(self, common_prefix_len: int) -> int:
        return common_prefix_len

    #: the stock kernel can read a head-split view of the cache (``[blocks * Hk, 1, block, ...]``), so a sparse
    #: group can attend its selected blocks in place (``attention: paged``)
    supports_paged_sparse = False

    def subset_metadata(self, base, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, num_tokens: int, heads: tuple[int, int] | None = None):
        """Stock metadata for a sub-batch of rows (work partitions must be rebuilt for new ``seq_lens``);
        ``heads`` = (query, KV) heads per sequence for the head-split view."""
        extra = {"heads": heads} if heads else {}
        return dataclasses.replace(
            base, num_actual_tokens=num_tokens, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_table=block_table, max_seq_len=int(seq_lens.max()),
            max_query_len=int((query_start_loc[1:] - query_start_loc[:-1]).max()),
            **self.subset_fields(query_start_loc, seq_lens, **extra))

    def subset_fields(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> dict:
        raise NotImplementedError


class SentenceKVImplMixin:
    _layer: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "sinks", None) is not None:
            # learned per-head attention sinks (s_aux): the sparse paths attend a subset of the context per KV
            # head and do not add the sink term, so they would change the model's attention silently
            raise ValueError("SentenceKV does not support models with learned attention sinks (per-head s_aux, "
                             "e.g. gpt-oss); serve this model without --attention-backend sentencekv")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "plan", None)
        if plan is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if self._layer is None:
            self._layer = layer_index(layer.layer_name)
        layer_idx = self._layer
        store = STATE.store
        assert store is not None
        for copy in plan.obs:
            copy.req.obs[layer_idx, copy.dst_lo:copy.dst_lo + len(copy.src)] = query[copy.src].float()
        for job in plan.catch_ups:
            self._catch_up(store, layer_idx, layer, kv_cache, job)
        if plan.fold is not None:
            self._update_running_sums(store, layer_idx, query, key, plan)
        for job in plan.index_builds:
            self._build_index(store, layer_idx, layer, kv_cache, job)
        if not plan.sparse:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if plan.dense is not None:
            self._dense(layer, query, key, value, kv_cache, output, plan.dense)
        counts: list[int] = []
        for group in plan.sparse:
            if policies.get(group.policy).stateful:
                counts += self._sparse_stateful(layer_idx, layer, query, key, kv_cache, output, group)
                continue
            sparse = self._sparse_paged if group.paged is not None else self._sparse
            counts += sparse(store, layer_idx, layer, query, kv_cache, output, group)
        metrics.observe_attended(counts)
        return output

    # -- index maintenance ---------------------------------------------------------------------------------

    def _update_running_sums(self, store: UnitStore, layer_idx: int, query, key, plan: StepPlan) -> None:
        """Add this step's token of every indexed decode row to its open unit: the query summed over each KV
        head's query group (the selection query) and the key statistics (closing and resetting are per step, in
        the planner)."""
        fold = plan.fold
        if fold.native is not None and fold.native(layer_idx, query, key):
            return
        tok = fold.rows if fold.rows is not None else fold.tok
        q, k = query[tok], key[tok]
        q = q.view(q.shape[0], self.num_kv_heads, -1, self.head_size).sum(2, dtype=torch.float32)
        store.fold_open(layer_idx, fold.slot, q, k.float())

    def _cached_keys(self, layer, kv_cache, block_row: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Keys ``[hi - lo, Hk, D]`` of one request's cached positions ``lo..hi-1`` (block table row
        ``[1, max_blocks]``)."""
        return self._block_layout(layer, kv_cache).range_keys(kv_cache, block_row[0], lo, hi)

    def _catch_up(self, store: UnitStore, layer_idx: int, layer, kv_cache, job: CatchUp) -> None:
        """A row nearing ``sparse_from``: the statistics of the sentences it generated while it did not fold, and
        of its open one so far, reduced from the keys in the paged cache the way the fold would have
        (``UnitStore.catch_up``)."""
        keys = self._cached_keys(layer, kv_cache, job.block_row, *job.span)
        store.catch_up(layer_idx, job.slot, keys.float(), job.seg, job.unit_slots, job.count,
                       policies.indexers(STATE.units))

    def _build_index(self, store: UnitStore, layer_idx: int, layer, kv_cache, job: IndexBuild) -> None:
        """Prompt index for this layer, from the keys just written to the paged cache: the unit features of the
        server's policies, and the request's own token-level features (SnapKV) if its policy has some."""
        req = job.req
        keys = self._cached_keys(layer, kv_cache, job.block_row, 0, req.prompt_len)
        obs = req.window(layer_idx)
        for policy in policies.indexers(STATE.units):
            feats, valid = policy.build_units(keys, job.spans, obs, req.cfg)
            for name, value in feats.items():
                store.set_units(name, layer_idx, job.unit_slots, value)
            store.valid[layer_idx, job.unit_slots] = valid
        policy = policies.get(req.cfg.policy)
        layer_state = None
        if policy.stateful:
            window = obs if obs is not None else keys.new_zeros(0, self.num_heads, self.head_size, dtype=torch.float32)
            layer_state = policy.init_state(keys, window, req.punct, req.cfg)
        req.set_layer_index(layer_idx, store.dims[0], policy.build_tokens(keys, obs, req.cfg), layer_state)

    # -- attention -----------------------------------------------------------------------------------------

    def _dense(self, layer, query, key, value, kv_cache, output, dense: DenseSubset) -> None:
        """Stock kernel on the dense rows only, through sub-batch metadata built by the builder. Consecutive rows
        (a prefill chunk beside the decode rows) are passed as views: the kernel reads strided queries and writes
        the output rows in place (copying a 4k-token chunk in and out cost ~2 ms a layer)."""
        if dense.rows is not None:
            rows = dense.rows
            super().forward(layer, query[rows], key[rows], value[rows], kv_cache, dense.metadata, output[rows])
            return
        q = query[dense.tok].contiguous()
        out = torch.empty((len(dense.tok), *output.shape[1:]), dtype=output.dtype, device=output.device)
        super().forward(layer, q, key[dense.tok], value[dense.tok], kv_cache, dense.metadata, out)
        output[dense.tok] = out

    def _unit_features(self, store: UnitStore, layer_idx: int,
                       group: SparseGroup) -> tuple[torch.Tensor, UnitFeatures]:
        """Selection query (mean query of the open sentence over each KV head's query group) and unit features."""
        per_kv_head = self.num_heads // self.num_kv_heads
        q_sel = store.query_sums(layer_idx, group.slot) / (group.q_count * per_kv_head)[:, None, None]
        valid = store.valid_rows(layer_idx, group.unit_slots) & group.unit_valid[..., None]
        policy = policies.get(group.policy)
        return q_sel, policy.features(store.unit_rows(layer_idx, group.unit_slots, policy.slots), valid)

    def _sparse_paged(self, store: UnitStore, layer_idx: int, layer, query, kv_cache, output,
                      group: SparseGroup) -> list[int]:
        """Score sentences, take the blocks that hold the best ones (``core/blocks.py``), and let the stock kernel
        read them in place through the head-split view of the cache: no gather, no copy.

        The query sum is not divided by the sentence length: a positive per-row factor does not change which
        blocks a row takes. Padding units need no mask: they map to the padding column.
        """
        t0 = time.perf_counter()
        paged = group.paged
        policy = policies.get(group.policy)
        blocks, table = paged.blocks, None
        if paged.native is not None:       # one native call: the tables, or the logical blocks (host tier)
            found = paged.native(layer_idx, query)
            blocks, table = (found, None) if group.host is not None else (None, found)
        elif blocks is None:
            valid = paged.valid[layer_idx]
            units = store.unit_rows(layer_idx, group.unit_slots, policy.slots, scratch=True)
            scores = policy.raw_score(store.query_sums(layer_idx, group.slot), policy.features(units, valid, True))
            blocks = select_blocks(block_scores(scores, paged.plan, valid.transpose(1, 2)), paged.plan)
        t1 = time.perf_counter()
        if group.host is not None:     # the planner checked that every hot set can hold its selected blocks
            entries, _ = make_resident(STATE.host, STATE.hot, self._block_layout(layer, kv_cache), layer_idx,
                                       STATE.step, group.slot, group.host, blocks, blocks != paged.plan.trash)
            table = physical_tables(blocks, with_trash_column(entries, paged.plan.trash))
        elif table is None:
            table = physical_tables(blocks, paged.tables)
        paged.metadata.block_table = table
        t2 = time.perf_counter()
        q, out, in_place = self._head_split_rows(query, output, group, kv_cache.shape[1],
                                                 paged.native.query if paged.native is not None else None)
        self.head_split_attention(layer, q, kv_cache, paged.metadata, out)
        if not in_place:
            output[group.tok] = out.view(-1, self.num_heads, self.head_size)
        metrics.observe_decode_phases(selection=t1 - t0, attention=time.perf_counter() - t2, transfer=t2 - t1)
        return paged.plan.seq_lens.tolist() if layer_idx == 0 else []

    def _head_split_rows(self, query, output, group: SparseGroup, hk: int,
                         gathered: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The group's queries and outputs as ``[R * Hk, Hq / Hk, D]`` (each (row, KV head) one sequence).
        ``gathered``: the query already in that shape (the native selection copies it). When the rows are
        consecutive and a row's heads contiguous, the others are views made by one ``as_strided`` each: a served
        layer runs after its weights went through the caches, where every tensor op in Python costs microseconds.
        Otherwise the query is copied, and the output (``in_place`` False) written back by the caller."""
        g, d = self.num_heads // hk, self.head_size
        shape, strides = (-1, g, d), (g * d, d, 1)
        rows = group.rows
        if rows is None:
            q = gathered if gathered is not None else query[group.tok].reshape(shape)
            return q, torch.empty_like(q), False
        n = (rows.stop - rows.start) * hk
        if gathered is not None:
            q = gathered
        elif n == hk and _heads_contiguous(query, d):     # one row: its heads are a contiguous [Hq, D] in qkv
            q = query.as_strided((n, g, d), strides, query.storage_offset() + rows.start * query.stride(0))
        else:
            q = query[rows].reshape(shape)    # q is a strided view of qkv
        if output.is_contiguous():
            offset = output.storage_offset() + rows.start * output.stride(0)
            return q, output.as_strided((n, g, d), strides, offset), True
        return q, torch.empty_like(q), False

    def head_split_attention(self, layer, query, kv_cache, metadata, output) -> None:
        """The stock kernel over the head-split view ``[blocks * Hk, 1, block, 2D]`` of the cache: each (row, KV
        head) one sequence of one KV head, ``metadata`` its block tables. Backends whose builder sets
        ``supports_paged_sparse`` implement it (only those reach the paged path)."""
        raise NotImplementedError

    def _sparse(self, store: UnitStore, layer_idx: int, layer, query, kv_cache, output,
                group: SparseGroup) -> list[int]:
        """Select per KV head, gather the selected K/V from the paged cache, exact softmax over them."""
        t0 = time.perf_counter()
        policy = policies.get(group.policy)
        q_sel, feats = self._unit_features(store, layer_idx, group) if policy.uses_query else (None, None)
        tokens = group.tokens.layer(layer_idx) if group.tokens is not None else None
        details: dict | None = {} if group.traced else None
        pos, ok = policy.positions(q_sel, feats, group.batch, group.width, details, tokens)
        if pos.shape[1] != self.num_kv_heads:
            pos, ok = pos.expand(-1, self.num_kv_heads, -1), ok.expand(-1, self.num_kv_heads, -1)
        t1 = time.perf_counter()
        layout = self._block_layout(layer, kv_cache)
        tiered = group.host is not None
        if tiered:     # single-head policies expanded pos over heads: make it contiguous
            pos, ok = pos.contiguous(), ok.contiguous()
            entries, host_tab = make_resident(STATE.host, STATE.hot, layout, layer_idx, STATE.step, group.slot,
                                              group.host, pos // layout.block_size, ok)
        t2 = time.perf_counter()
        if tiered:
            k, v = layout.gather_entries(kv_cache, entries.gather(2, pos // layout.block_size), pos)
        else:
            k, v = layout.gather(kv_cache, group.block_table, pos)
        t3 = time.perf_counter()
        if tiered:
            k, v = read_host_tokens(STATE.host, layout, layer_idx, host_tab, pos, ok, k, v)
        t4 = time.perf_counter()
        output[group.tok] = gathered_attention(query[group.tok], k, v, ok, self.scale, details).to(output.dtype)
        t5 = time.perf_counter()
        # CPU ops are synchronous, so these are exact there; on CUDA they are launch times
        metrics.observe_decode_phases(selection=t1 - t0, attention=(t3 - t2) + (t5 - t4),
                                      transfer=(t2 - t1) + (t4 - t3))
        if details is not None and "scores" in details:
            self._trace(layer_idx, group, details, pos, ok)
        return ok.sum(-1).max(-1).values.tolist() if layer_idx == 0 else []

    def _sparse_stateful(self, layer_idx: int, layer, query, key, kv_cache, output, group: SparseGroup) -> list[int]:
        """A stateful policy (``reference``): per row, the policy steps its own state of this layer with this
        token and returns the positions each *query* head attends; they are gathered per query head and attended
        exactly (a query head is its own group of one)."""
        t0 = time.perf_counter()
        policy = policies.get(group.policy)
        rows = group.tok.tolist()
        positions = (group.batch.seq_lens - 1).tolist()
        chosen = [policy.step(req.layer_states[layer_idx], query[t], key[t], pos, punct, req.cfg)
                  for req, t, pos, punct in zip(group.reqs, rows, positions, group.punct, strict=True)]
        r, hq, hk = len(rows), self.num_heads, self.num_kv_heads
        width = max(len(heads) for per_row in chosen for heads in per_row)
        pos = torch.zeros(r, hq, width, dtype=torch.long)
        ok = torch.zeros(r, hq, width, dtype=torch.bool)
        for j, per_row in enumerate(chosen):
            for h, heads in enumerate(per_row):
                pos[j, h, :len(heads)] = torch.tensor(heads, dtype=torch.long)
                ok[j, h, :len(heads)] = True
        pos, ok = pos.to(query.device), ok.to(query.device)
        t1 = time.perf_counter()
        k, v = self._block_layout(layer, kv_cache).gather_query_heads(kv_cache, group.block_table, pos, hk)
        output[group.tok] = gathered_attention(query[group.tok], k, v, ok, self.scale).to(output.dtype)
        metrics.observe_decode_phases(selection=t1 - t0, attention=time.perf_counter() - t1, transfer=0.0)
        return ok.sum(-1).max(-1).values.tolist() if layer_idx == 0 else []

    def _trace(self, layer_idx: int, group: SparseGroup, details: dict, pos, ok) -> None:
        """Accumulate, per unit, selections, scores and the attention mass its selected tokens received (sinks and
        the recent window excluded), over layers and heads; hand them to the requests at the last layer."""
        chosen = details["allowed"] > 0
        hits = chosen.sum(1).float()
        scores = details["scores"].masked_fill(~chosen, 0).sum(1)
        b = group.batch
        r, hk, w = pos.shape
        middle = ok & (pos >= b.sinks.view(r, 1, 1)) & (pos < (b.seq_lens - b.recent).view(r, 1, 1))
        unit = torch.searchsorted(b.ends.contiguous(), pos.reshape(r, -1), right=True).view(r, hk, w)
        n_units = hits.shape[1]
        mass = torch.zeros(r, n_units + 1, device=pos.device)
        mass.scatter_add_(1, unit.clamp(max=n_units).reshape(r, -1),
                          (details["probs"] * middle).reshape(r, -1))
        acc = (hits, scores, mass[:, :n_units])
        prev = group.trace_acc
        group.trace_acc = acc if prev is None else tuple(a + x for a, x in zip(prev, acc, strict=True))
        if layer_idx == STATE.store.dims[0] - 1:
            for row, req, n in group.traced:
                req.trace.add(*(a[row, :n] for a in group.trace_acc))

    def _block_layout(self, layer, kv_cache) -> BlockLayout:
        """Probed once per cache shape (layers of one model share it)."""
        key = (tuple(kv_cache.shape[1:]), kv_cache.stride()[1:], kv_cache.dtype, str(kv_cache.device))
        if key not in _LAYOUTS:
            def write(k, v, cache, slots):
                self.do_kv_cache_update(layer, k, v, cache, slots)

            _LAYOUTS[key] = BlockLayout.probe(write, kv_cache, self.block_size_of(kv_cache), self.num_kv_heads,
                                              self.head_size)
        return _LAYOUTS[key]

    @staticmethod
    def block_size_of(kv_cache: torch.Tensor) -> int:
        """Both CPU_ATTN and FlashAttention caches are ``[num_blocks, Hk, block, 2*D]``-shaped in vLLM 0.32."""
        return kv_cache.shape[2]
