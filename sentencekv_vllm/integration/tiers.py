"""Two-tier KV memory bookkeeping.

* :class:`EngineTier` (EngineCore process, one instance ``ENGINE``) is the single authority on the host tier: it
  knows each request's budget/policy, decides which blocks leave the device (via ``SentenceKVManager``), assigns
  host slots and queues the copies for the worker. Decisions reach the worker through KV connector metadata.
* :class:`HostPool` (worker process) holds the host copies, block for block in the device cache's own layout, and
  performs the copies before the step's forward (``handle_preemptions``), i.e. before a freed block can be reused.

Residency policy: after prefill, once a request's context exceeds its budget (it then always decodes sparsely),
all blocks except the sink blocks and those overlapping the recent window live on the host; selected tokens of
host blocks are gathered from host memory at each step ("swap-in" into the attention scratch), so no hot set is
kept on the device and the device footprint per request is ``cdiv(sinks, bs) + cdiv(recent, bs) + 1`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration import metrics


@dataclass
class EngineTier:
    cfg: SentenceKVConfig = field(default_factory=SentenceKVConfig)
    host_capacity: int = 0
    free_slots: list[int] = field(default_factory=list)
    budgets: dict[str, tuple[int, str]] = field(default_factory=dict)
    owned: dict[str, list[int]] = field(default_factory=dict)
    pending_spills: list[tuple[str, int, int, int]] = field(default_factory=list)
    pending_releases: list[str] = field(default_factory=list)

    def configure(self, cfg: SentenceKVConfig, host_capacity: int) -> None:
        self.cfg, self.host_capacity = cfg, host_capacity
        self.free_slots = list(range(host_capacity - 1, -1, -1))

    def on_request(self, req_id: str, extra_args: dict[str, Any] | None) -> None:
        try:
            cfg = self.cfg.with_request_overrides(extra_args)
        except ValueError:      # already answered with a 400 by the API server; never fail the engine
            cfg = self.cfg
        self.budgets[req_id] = (cfg.budget, cfg.policy)

    def spill_range(self, req_id: str, processed: int, prompt_len: int, block_size: int) -> tuple[int, int]:
        """Logical blocks that may leave the device now: ``[first, last)``; empty while the request is dense."""
        budget, policy = self.budgets.get(req_id, (None, "full"))
        if budget is None or policy == "full" or processed < prompt_len or processed < budget:
            return 0, 0
        first = -(-self.cfg.sinks // block_size)
        last = max(first, (processed - self.cfg.recent) // block_size)
        return first, last

    def take_host_slots(self, req_id: str, n: int) -> list[int]:
        n = min(n, len(self.free_slots))
        slots = [self.free_slots.pop() for _ in range(n)]
        self.owned.setdefault(req_id, []).extend(slots)
        return slots

    def record_spill(self, req_id: str, moves: list[tuple[int, int, int]]) -> None:
        self.pending_spills.extend((req_id, logical, block, slot) for logical, block, slot in moves)
        metrics.observe_host_blocks(self.host_used, spilled=len(moves))

    def release(self, req_id: str) -> None:
        """Finish, abort or preemption: host slots return to the pool; the worker forgets the request's map."""
        slots = self.owned.pop(req_id, [])
        self.free_slots.extend(slots)
        if slots:
            self.pending_releases.append(req_id)
            metrics.observe_host_blocks(self.host_used)

    def forget(self, req_id: str) -> None:
        self.budgets.pop(req_id, None)

    def take_pending(self) -> tuple[list[tuple[str, int, int, int]], list[str]]:
        spills, releases = self.pending_spills, self.pending_releases
        self.pending_spills, self.pending_releases = [], []
        return spills, releases

    @property
    def host_used(self) -> int:
        return self.host_capacity - len(self.free_slots)


ENGINE = EngineTier()


class HostPool:
    """Host copies of device blocks, one flat ``[slots, block_numel]`` tensor per layer (pinned on CUDA)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], capacity: int) -> None:
        from sentencekv_vllm.integration.compat import layer_index
        from sentencekv_vllm.integration.kv_layout import block_numel

        self.layers = sorted(kv_caches, key=layer_index)
        self.device_flat = []
        self.pool = []
        pin = next(iter(kv_caches.values())).is_cuda
        for name in self.layers:
            cache = kv_caches[name]
            per_block = block_numel(cache)
            self.device_flat.append(cache.as_strided((cache.shape[0], per_block), (cache.stride(0), 1)))
            self.pool.append(torch.empty((capacity, per_block), dtype=cache.dtype, device="cpu", pin_memory=pin))
        self.capacity = capacity
        self.bytes_out = 0

    def spill(self, block_ids: list[int], slots: list[int]) -> None:
        """Copy device blocks to host slots, every layer (before the scheduler's reuse of those blocks)."""
        if not block_ids:
            return
        src = torch.tensor(block_ids, dtype=torch.long)
        dst = torch.tensor(slots, dtype=torch.long)
        for dev, host in zip(self.device_flat, self.pool, strict=True):
            host[dst] = dev[src.to(dev.device)].to("cpu")
            self.bytes_out += host[0].numel() * host.element_size() * len(slots)


def host_block_bytes(kv_cache_config: Any) -> int:
    """Bytes one logical block takes across all layers (what a host slot must hold)."""
    total = 0
    for group in kv_cache_config.kv_cache_groups:
        total += group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total
