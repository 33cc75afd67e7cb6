"""Worker side of the host tier: how a sparse step reads KV that lives on the host.

Per step (planner): each row's host-slot table (:func:`host_slot_table`), and whether the paged path can run
(:func:`hot_sets_hold`: the stock kernel reads only device blocks). Per layer (attention impl): the selected host
blocks go through each request's hot set (:func:`make_resident`, policy in ``hotset.py``), and what is still on
the host is read token-wise (:func:`read_host_tokens`).
"""

from __future__ import annotations

from typing import Any

import torch

from sentencekv_vllm.core.blocks import BlockPlan
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.kv_layout import BlockLayout
from sentencekv_vllm.integration.tier.host_pool import HostPool


def host_slot_table(reqs: list[Any], max_blocks: int) -> torch.Tensor | None:
    """``[R, max_blocks]`` host slot of each logical block (-1 = on the device), or None without a host tier."""
    if not any(req.host_map for req in reqs):
        return None
    host_slots = torch.full((len(reqs), max_blocks), -1, dtype=torch.long)
    for j, req in enumerate(reqs):
        if req.host_map:
            host_slots[j, torch.tensor(list(req.host_map.keys()))] = torch.tensor(list(req.host_map.values()))
    return host_slots


def hot_sets_hold(plan: BlockPlan, reqs: list[Any], sinks: int, block_size: int) -> bool:
    """With the host tier, every selected block must be on the device for the stock kernel: each request's hot
    set must hold all of its selected blocks but the sink blocks and the last one (never spilled)."""
    sink_blocks = -(-sinks // block_size)
    for req, k in zip(reqs, plan.num_blocks.tolist(), strict=True):
        if req.host_map and (req.hot is None or len(req.hot) < k - sink_blocks - 1):
            return False
    return True


def make_resident(host: HostPool, layer_idx: int, step: int, reqs: list[Any], block_table: torch.Tensor,
                  host_slots: torch.Tensor, logical: torch.Tensor, valid: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, the selected host-tier blocks (``logical`` ``[R, N]`` where ``valid``), most-selected first,
    go through the request's hot set; returns (block table, host-slot table) with resident blocks remapped."""
    logical = logical.masked_fill(~valid, 0)
    on_host = valid & (host_slots.gather(1, logical) >= 0)
    new_table, new_slots = block_table.long().clone(), host_slots.clone()
    hits = misses = loaded = 0
    for j, req in enumerate(reqs):
        if req.hot is None or not len(req.hot):
            continue
        blocks, counts = torch.unique(logical[j][on_host[j]], return_counts=True)
        needed = blocks[counts.argsort(descending=True, stable=True)]

        def load(dst: torch.Tensor, src: torch.Tensor, j: int = j) -> None:
            host.load(layer_idx, dst, host_slots[j, src])

        held, ids, n_hit, n_loaded = req.hot.resolve(layer_idx, needed, step, load)
        new_table[j, held], new_slots[j, held] = ids, -1
        hits, misses, loaded = hits + n_hit, misses + needed.numel() - n_hit, loaded + n_loaded
    if hits or misses:
        bytes_per_block = host.pool[layer_idx].shape[1] * host.pool[layer_idx].element_size()
        metrics.observe_hot_set(hits, misses, loaded, loaded * bytes_per_block)
    return new_table, new_slots


def read_host_tokens(host: HostPool, layout: BlockLayout, layer_idx: int, host_table: torch.Tensor,
                     pos: torch.Tensor, ok: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tokens whose blocks are on the host and not in the hot set are read token-wise from the host
    (``k`` / ``v`` ``[R, Hk, W, D]`` gathered from the device, replaced where the block is on the host)."""
    r, hk, w = pos.shape
    slots = host_table.gather(1, (pos // layout.block_size).reshape(r, -1)).view(r, hk, w)
    on_host = (slots >= 0) & ok
    if not bool(on_host.any()):
        metrics.observe_swap_in(0, int(ok.sum()), layer_idx)
        return k, v
    host_pos, host_slots = pos.cpu(), slots.clamp(min=0).cpu()
    hk_, hv_ = layout.gather_blocks(host.pool[layer_idx], host_slots, host_pos)
    sel = on_host[..., None]
    k = torch.where(sel, hk_.to(k.device, non_blocking=True), k)
    v = torch.where(sel, hv_.to(v.device, non_blocking=True), v)
    metrics.observe_swap_in(int(on_host.sum()), int(ok.sum()), layer_idx, 2 * k.shape[-1] * k.element_size())
    return k, v
