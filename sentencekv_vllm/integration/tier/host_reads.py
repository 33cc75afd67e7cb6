"""Worker side of the host tier: how a sparse step reads KV that lives on the host.

Per step (planner): each row's host-tier tables (:func:`host_tables`), and whether the paged path can run
(:func:`hot_sets_hold`: the stock kernel reads only device blocks). Per layer (attention impl): the selected host
blocks go through the rows' hot sets, all rows at once (:func:`make_resident`, policy in ``hotset.py``), and what
is still on the host is read token-wise (:func:`read_host_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sentencekv_vllm import native
from sentencekv_vllm.core.blocks import BlockPlan, head_entries
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.kv_layout import BlockLayout
from sentencekv_vllm.integration.tier.host_pool import HostPool
from sentencekv_vllm.integration.tier.hotset import HotSets


@dataclass
class HostTables:
    """One step's host-tier view of a sparse group's rows (built once per step, read by every layer)."""

    slots: torch.Tensor      # [R, M] host slot of each logical block, -1 = on the device
    entries: torch.Tensor    # [R, Hk, M] head-split entry (``p * Hk + h``) of each KV head's logical block
    per_head: torch.Tensor   # [R, Hk, M] ``slots`` for each KV head


def host_tables(reqs: list[Any], block_table: torch.Tensor, num_kv_heads: int) -> HostTables | None:
    """The rows' host-tier tables (``block_table`` ``[R, M]``, on the model's device), or None when no row has a
    block on the host."""
    if not any(req.host_map for req in reqs):
        return None
    r, m = block_table.shape
    slots = torch.full((r, m), -1, dtype=torch.long)
    for j, req in enumerate(reqs):
        if req.host_map:
            slots[j, torch.tensor(list(req.host_map.keys()))] = torch.tensor(list(req.host_map.values()))
    slots = slots.to(block_table.device)
    return HostTables(slots, head_entries(block_table, num_kv_heads),
                      slots[:, None, :].expand(r, num_kv_heads, m).contiguous())


def hot_sets_hold(plan: BlockPlan, reqs: list[Any], hot: HotSets | None, sinks: int, block_size: int) -> list[bool]:
    """With the host tier, every selected block must be on the device for the stock kernel: per request, whether
    its hot set has an entry for each KV head's selected blocks but the sink blocks and the last one (never
    spilled)."""
    sink_blocks = -(-sinks // block_size)
    return [not req.host_map or (hot is not None and hot.size(req.slot) >= hot.heads * (k - sink_blocks - 1))
            for req, k in zip(reqs, plan.num_blocks.tolist(), strict=True)]


def make_resident(host: HostPool, hot: HotSets | None, layout: BlockLayout, layer_idx: int, step: int,
                  slots: torch.Tensor, tables: HostTables, logical: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected host-tier blocks of every row and KV head (``logical`` ``[R, Hk, N]`` where ``valid``;
    ``slots``: the rows' request slots) go through the rows' hot sets at once, most-selected first.

    Returns, per row, KV head and logical block ``[R, Hk, M]``: the head-split entry to read (``p * Hk + s``: the
    block table's own block and head, or the hot entry now holding that head of that block) and the host slot
    still to read from (-1: on the device).
    """
    if hot is None:
        return tables.entries, tables.per_head
    resolve = _resolve_native if layout.heads_contiguous and native.usable(logical, host.pool[layer_idx]) \
        else _resolve_torch
    entries, host_tab, hits, misses, loaded = resolve(host, hot, layout, layer_idx, step, slots, tables, logical,
                                                      valid)
    if hits or misses:
        pool = host.pool[layer_idx]
        slice_bytes = pool.shape[1] // logical.shape[1] * pool.element_size()     # one KV head of a block
        metrics.observe_hot_set(hits, misses, loaded, loaded * slice_bytes)
    return entries, host_tab


def _resolve_torch(host: HostPool, hot: HotSets, layout: BlockLayout, layer_idx: int, step: int,
                   slots: torch.Tensor, tables: HostTables, logical: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """:func:`make_resident` in torch ops (``HotSets.resolve``, then the tables remapped): the reference, and
    the path on CUDA. Returns the tables and the hit / miss / load counts."""
    r, hk, n = logical.shape
    host_slots = tables.slots
    m = host_slots.shape[1]
    heads = torch.arange(hk, device=logical.device).view(1, hk, 1)
    entries, host_tab = tables.entries.view(r, hk * m), tables.per_head.view(r, hk * m)
    logical = logical.masked_fill(~valid, 0)
    on_host = valid & (host_slots.gather(1, logical.view(r, -1)).view(r, hk, n) >= 0)
    keys = logical * hk + heads

    def load(dst: torch.Tensor, row: torch.Tensor, key: torch.Tensor) -> None:
        host.load(layer_idx, dst, host_slots[row, key // hk], key % hk, layout.head_offsets(dst.device),
                  layout.heads_contiguous)

    held, ids, hits, misses, loaded = hot.resolve(layer_idx, slots, keys.view(r, -1), on_host.view(r, -1), m * hk,
                                                  step, load)
    if held.shape[1]:
        col = torch.where(held >= 0, (held % hk) * m + held // hk, hk * m)    # key b*Hk+h -> column h*M+b
        entries = _pad_column(entries).scatter_(1, col, ids)[:, :hk * m]
        host_tab = _pad_column(host_tab).scatter_(1, col, -1)[:, :hk * m]
    return entries.view(r, hk, m), host_tab.view(r, hk, m), hits, misses, loaded


def _resolve_native(host: HostPool, hot: HotSets, layout: BlockLayout, layer_idx: int, step: int,
                    slots: torch.Tensor, tables: HostTables, logical: torch.Tensor,
                    valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """:func:`_resolve_torch` in one native call (CPU, each KV head's slice of a block contiguous): the same
    hot-set policy, swap-ins, tables and counts (``tests/core/test_host_tier.py`` compares them)."""
    r, hk, m = tables.entries.shape
    entries, host_tab = tables.entries.reshape(r, hk * m).clone(), tables.per_head.reshape(r, hk * m).clone()
    dev, pool = host.device_flat[layer_idx], host.layer(layer_idx)
    hits, misses, loaded = native.hot_resolve(slots, logical, valid, tables.slots, hk, step, hot.block_ids,
                                              hot.holds[layer_idx], hot.last[layer_idx],
                                              dev.view(dev.shape[0] * hk, -1), pool.view(pool.shape[0] * hk, -1),
                                              entries, host_tab)
    return entries.view(r, hk, m), host_tab.view(r, hk, m), hits, misses, loaded


def _pad_column(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1)


def read_host_tokens(host: HostPool, layout: BlockLayout, layer_idx: int, host_table: torch.Tensor,
                     pos: torch.Tensor, ok: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tokens whose block (for their KV head) is on the host and not in the hot set are read token-wise
    from the host (``host_table`` ``[R, Hk, M]``; ``k`` / ``v`` ``[R, Hk, W, D]`` gathered from the device,
    replaced where the block is on the host). Only those tokens' positions go to the host and only their K/V come
    back."""
    slots = host_table.gather(2, pos // layout.block_size)
    on_host = (slots >= 0) & ok
    where = on_host.nonzero(as_tuple=True)          # the one host sync of the read (the copy needs the count)
    n = where[0].numel()
    if n:
        host_k, host_v = layout.gather_tokens(host.layer(layer_idx), slots[where].cpu(), pos[where].cpu(),
                                              where[1].cpu())
        k = k.index_put(where, host_k.to(k.device, non_blocking=True))
        v = v.index_put(where, host_v.to(v.device, non_blocking=True))
    metrics.observe_swap_in(n, int(ok.sum()), layer_idx, 2 * k.shape[-1] * k.element_size())
    return k, v
