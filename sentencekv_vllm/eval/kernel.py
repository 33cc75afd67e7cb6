"""``sentencekv-eval kernel``: one attention layer's decode work, stock kernel vs SentenceKV, at real model shapes.

Stock: vLLM's CPU paged kernel over every request's whole context. SentenceKV: everything its decode path does
per layer — gather the rows' sentence centroids from the worker's unit pool and score them with the group-mean
query (in the pool's reused workspace, as the engine does), turn scores into blocks (paged) or token
positions (exact), then attend (stock kernel on the head-split view / gather + exact softmax). Random bf16 K/V
written through the stock cache-write op, 20-token sentences. Medians over repeats; configurations whose KV
would not fit ``--max-kv-gib`` are skipped and listed.

    sentencekv-eval kernel --out docs/eval/perf        # Llama-3.1-8B shapes: 32 q heads, 8 KV heads, dim 128
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sentencekv_vllm import native, policies
from sentencekv_vllm.core.attention import gathered_attention
from sentencekv_vllm.core.blocks import block_scores, head_split_tables, physical_tables, plan_blocks, select_blocks
from sentencekv_vllm.core.selection import SelectionBatch, UnitFeatures, group_mean_query
from sentencekv_vllm.integration.kv_layout import BlockLayout
from sentencekv_vllm.policies import select_positions


@dataclass
class PagedCache:
    """A random paged KV cache in CPU_ATTN's layout, ``r`` requests of ``t`` tokens each."""

    cache: torch.Tensor          # [N, Hk, block, 2D]
    table: torch.Tensor          # [R, max_blocks] int32
    isa: str
    block_size: int

    def split(self, heads_apart: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n, hk, bs, d2 = self.cache.shape
        view = self.cache.view(n * hk, 1, 2 * bs, d2 // 2) if heads_apart else self.cache.view(n, hk, 2 * bs, -1)
        return view.chunk(2, dim=2)


def random_cache(r: int, t: int, hk: int, d: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> PagedCache:
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if torch.cpu._is_amx_tile_supported():
        # CPU_ATTN's bf16 kernel uses AMX tiles, which Linux lets a process use only after it asks (vLLM's
        # workers have by then; a bare process dies of SIGILL without this)
        torch.cpu._init_amx()

    gen = torch.Generator().manual_seed(seed)
    isa = _get_attn_isa(dtype, block_size, d)
    nb = math.ceil(t / block_size)
    cache = PagedCache(torch.empty(r * nb, hk, block_size, 2 * d, dtype=dtype),
                       torch.randperm(r * nb, generator=gen).int().view(r, nb), isa, block_size)
    kc, vc = cache.split()
    for i in range(r):
        slots = (cache.table[i].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:t]
        k = torch.randn(t, hk, d, generator=gen).to(dtype)
        ops.cpu_attn_reshape_and_cache(k, torch.randn(t, hk, d, generator=gen).to(dtype), kc, vc, slots, isa)
    return cache


def scheduler(r: int, hq: int, hk: int, d: int, seq: torch.Tensor, cache: PagedCache,
              split_kv: bool = True) -> tuple[Any, torch.Tensor]:
    """Work partition as the backends build it (the head-split batch is not split along KV: ``compat.py``)."""
    from vllm import _custom_ops as ops

    qsl = torch.arange(r + 1, dtype=torch.int32)
    return ops.cpu_attn_get_scheduler_metadata(r, hq, hk, d, seq, cache.cache.dtype, qsl, True, -1, cache.isa,
                                               split_kv), qsl


def stock_step(cache: PagedCache, q: torch.Tensor, t: int) -> Callable[[], torch.Tensor]:
    from vllm import _custom_ops as ops

    r, hq, d = q.shape
    hk = cache.cache.shape[1]
    seq = torch.full((r,), t, dtype=torch.int32)
    md, qsl = scheduler(r, hq, hk, d, seq, cache)
    kc, vc = cache.split()
    out = torch.empty_like(q)

    def run() -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(q, kc, vc, out, qsl, seq, d ** -0.5, True, None, -1, cache.table, 0.0, md,
                                        None)
        return out
    return run


def sentences(r: int, t: int, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, t, length)[None].expand(r, -1).contiguous()
    return starts, (starts + length).clamp(max=t)


def paged_step(cache: PagedCache, q: torch.Tensor, t: int, tau: int, cents: UnitFeatures,
               use_native: bool = False) -> Callable[[], Any]:
    """SentenceKV's paged decode work for one layer (what ``impl._sparse_paged`` runs): the torch selection, or
    the native CPU kernel (``use_native``, what the engine runs on CPU)."""
    from vllm import _custom_ops as ops

    r, hq, d = q.shape
    hk = cache.cache.shape[1]
    starts, ends = sentences(r, t)
    seq_lens = torch.full((r,), t)
    plan = plan_blocks(starts, ends, torch.ones_like(starts, dtype=torch.bool), seq_lens, torch.full((r,), tau), 32,
                       seq_lens - 32, cache.block_size)
    seq = plan.seq_lens.repeat_interleave(hk).int()
    md, qsl = scheduler(r * hk, hq // hk, 1, d, seq, cache, split_kv=False)
    kc, vc = cache.split(heads_apart=True)
    out = torch.empty(r * hk, hq // hk, d, dtype=q.dtype)
    tables = head_split_tables(cache.table, hk, plan.trash)
    qsum = group_mean_query(q.float(), hk)       # the running group sum the impl keeps
    store, unit_slots = _unit_pool(cents, hq, cache.cache.dtype)
    policy = policies.get("sentencekv")

    slots = torch.arange(r)
    store.qsum[0, :r] = qsum
    valid = store.valid_rows(0, unit_slots)     # the torch path: the engine gathers every layer's masks once per step
    selector = native.BlockSelector(plan, unit_slots, slots, tables, hk, store.units["centroid"], store.qsum,
                                    store.valid) if use_native else None

    def run() -> torch.Tensor:
        if selector is not None:
            table = selector(0)
        else:   # as impl._sparse_paged: gather the rows' centroids into the pool's workspace, score them in place
            units = store.unit_rows(0, unit_slots, policy.slots, scratch=True)
            scores = policy.raw_score(store.query_sums(0, slots), policy.features(units, valid, True))
            blocks = select_blocks(block_scores(scores, plan, valid.transpose(1, 2)), plan)
            table = physical_tables(blocks, tables)
        ops.cpu_attention_with_kv_cache(q.view(r * hk, hq // hk, d), kc, vc, out, qsl, seq, d ** -0.5, True, None,
                                        -1, table, 0.0, md, None)
        return out
    return run


def _unit_pool(cents: UnitFeatures, hq: int, model_dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
    """The worker's unit pool (``integration.state.UnitStore``, one layer, in the dtype the engine keeps it for
    this model) holding ``cents`` ``[R, S, Hk, D]``, and each row's unit slots ``[R, S]`` (interleaved across
    rows, like requests admitted together)."""
    from sentencekv_vllm.core.index import index_dtype
    from sentencekv_vllm.integration.state import UnitStore

    r, n, hk, d = cents.a.shape
    store = UnitStore(1, hk, hq, d, r, cents.a.device, policies.get("sentencekv").slots, capacity=r * n,
                      unit_dtype=index_dtype(model_dtype))     # sized like the engine's start-up reservation
    slots = torch.tensor(store.alloc_units(r * n)).view(n, r).t().contiguous()
    store.set_units("centroid", 0, slots, cents.a.float())
    store.valid[0, slots] = cents.valid
    return store, slots


def exact_step(cache: PagedCache, q: torch.Tensor, t: int, tau: int, cents: UnitFeatures) -> Callable[[], Any]:
    """The exact path (``impl._sparse``): token positions, gather, exact softmax."""
    from vllm import _custom_ops as ops

    r, hq, d = q.shape
    hk = cache.cache.shape[1]
    starts, ends = sentences(r, t)
    batch = SelectionBatch.make(starts, ends, torch.full((r,), t), tau, 32, 32)

    def write(k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> None:
        kc, vc = c.view(c.shape[0], c.shape[1], 2 * c.shape[2], -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, s, cache.isa)

    layout = BlockLayout.probe(write, cache.cache, cache.block_size, hk, d)

    def run() -> torch.Tensor:
        q_sel = group_mean_query(q.float(), hk)
        pos, ok = select_positions("sentencekv", q_sel, cents, batch, min(tau, t))
        k, v = layout.gather(cache.cache, cache.table, pos)
        return gathered_attention(q, k, v, ok, d ** -0.5)
    return run


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(contexts: list[int], batches: list[int], taus: list[int], heads: tuple[int, int], d: int,
            block_size: int, repeats: int, max_kv_gib: float, exact: bool) -> dict[str, Any]:
    hq, hk = heads
    rows, skipped = [], []
    for t in contexts:
        for r in batches:
            kv_gib = r * t * hk * d * 2 * 2 / 2**30
            if kv_gib > max_kv_gib:
                skipped.append(f"{r}x{t} ({kv_gib:.1f} GiB of KV)")
                continue
            cache = random_cache(r, t, hk, d, block_size, torch.bfloat16)
            q = torch.randn(r, hq, d).to(torch.bfloat16)
            s = len(range(0, t, 20))
            cents = UnitFeatures(torch.randn(r, s, hk, d), torch.ones(r, s, hk, dtype=torch.bool))
            stock = timed(stock_step(cache, q, t), repeats)
            for tau in taus:
                row = {"context": t, "batch": r, "tau": tau, "stock_ms": stock,
                       "paged_ms": timed(paged_step(cache, q, t, tau, cents), repeats)}
                if native.usable(q):
                    row["native_ms"] = timed(paged_step(cache, q, t, tau, cents, use_native=True), repeats)
                if exact:
                    row["exact_ms"] = timed(exact_step(cache, q, t, tau, cents), max(3, repeats // 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
            del cache
    return {"rows": rows, "skipped": skipped}


def table(res: dict[str, Any]) -> str:
    exact = any("exact_ms" in r for r in res["rows"])
    nat = any("native_ms" in r for r in res["rows"])
    head = "| context | batch | τ | stock ms | paged ms | stock / paged |"
    head += " paged, native selection ms | stock / native |" if nat else ""
    head += " exact ms | stock / exact |" if exact else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        line = (f"| {r['context']} | {r['batch']} | {r['tau']} | {r['stock_ms']:.2f} | {r['paged_ms']:.2f} | "
                f"{r['stock_ms'] / r['paged_ms']:.1f}x |")
        if nat:
            line += f" {r['native_ms']:.2f} | {r['stock_ms'] / r['native_ms']:.1f}x |" if "native_ms" in r else " | |"
        if exact:
            line += f" {r['exact_ms']:.2f} | {r['stock_ms'] / r['exact_ms']:.2f}x |"
        lines.append(line)
    if res["skipped"]:
        lines.append(f"\nSkipped (KV above the memory cap): {', '.join(res['skipped'])}.")
    return "\n".join(lines) + "\n"


def main(args: Any) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    res = measure(ints(args.contexts), ints(args.batches), ints(args.taus), (args.q_heads, args.kv_heads),
                  args.head_dim, args.block_size, args.repeats, args.max_kv_gib, not args.no_exact)
    res["meta"] = {"command": " ".join(["sentencekv-eval", "kernel", *args.argv]), "threads": torch.get_num_threads(),
                   "shapes": {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                              "block_size": args.block_size, "dtype": "bfloat16"}}
    (out / "kernel.json").write_text(json.dumps(res, indent=2))
    md = table(res)
    (out / "kernel.md").write_text(f"Command: `{res['meta']['command']}`\n\n{md}")
    print(md)
    return 0
