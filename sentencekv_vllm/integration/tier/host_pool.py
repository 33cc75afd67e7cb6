"""Worker side of the host tier: the host copies, and the step's spills applied before the forward.

:class:`HostPool` holds one flat ``[slots, block_numel]`` tensor per layer, block for block in the device cache's own
layout, so a host block is read with the same offsets as a device block (``kv_layout.BlockLayout``). The connector
calls :func:`apply_spills` in ``handle_preemptions``, which vLLM runs before the forward: the copies land before any
freed block can be overwritten.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.compat import layer_index
from sentencekv_vllm.integration.kv_layout import block_numel
from sentencekv_vllm.integration.tier.messages import Spill


class HostPool:
    """Host copies of device blocks, one flat ``[slots, block_numel]`` tensor per layer (pinned on CUDA)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], capacity: int) -> None:
        self.device_flat = []
        self.pool = []
        pin = next(iter(kv_caches.values())).is_cuda
        for name in sorted(kv_caches, key=layer_index):     # pool[i] is layer i
            cache = kv_caches[name]
            per_block = block_numel(cache)
            self.device_flat.append(cache.as_strided((cache.shape[0], per_block), (cache.stride(0), 1)))
            self.pool.append(torch.empty((capacity, per_block), dtype=cache.dtype, device="cpu", pin_memory=pin))
        self.bytes_out = 0

    def spill(self, spills: list[Spill]) -> None:
        """Copy device blocks to host slots, every layer (before the scheduler's reuse of those blocks)."""
        if not spills:
            return
        src = torch.tensor([s.block for s in spills], dtype=torch.long)
        dst = torch.tensor([s.slot for s in spills], dtype=torch.long)
        for dev, host in zip(self.device_flat, self.pool, strict=True):
            host[dst] = dev[src.to(dev.device)].to("cpu")
            self.bytes_out += host[0].numel() * host.element_size() * len(spills)

    def load(self, layer: int, block_ids: torch.Tensor, slots: torch.Tensor) -> int:
        """Copy host slots into device blocks of one layer (a hot-set swap-in); returns the bytes moved."""
        dev, host = self.device_flat[layer], self.pool[layer]
        dev[block_ids.to(dev.device)] = host[slots.cpu()].to(dev.device, non_blocking=True)
        return len(slots) * host.shape[1] * host.element_size()


def apply_spills(host: HostPool, spills: list[Spill], requests: dict[str, Any], new_hot_set: Any) -> None:
    """Copy this step's spilled blocks to their host slots and tell each request (``RequestState.spilled``) which
    of its logical blocks now live where; ``new_hot_set()`` makes a request's first hot set."""
    if not spills:
        return
    t0 = time.perf_counter()
    host.spill(spills)
    for spill in spills:
        req = requests.get(spill.req_id)
        if req is not None:
            req.spilled(spill.logical, spill.slot, spill.block if spill.kept else None, new_hot_set)
    metrics.observe_transfer(time.perf_counter() - t0)


