"""Two-tier KV memory bookkeeping.

* :class:`EngineTier` (EngineCore process, one instance ``ENGINE``) is the single authority on the host tier: it
  knows each request's budget/policy, decides which blocks leave the device (via ``SentenceKVManager``), assigns
  host slots and queues the copies for the worker. Decisions reach the worker through KV connector metadata.
* :class:`HostPool` (worker process) holds the host copies, block for block in the device cache's own layout, and
  performs the copies before the step's forward (``handle_preemptions``), i.e. before a freed block can be reused.

Residency policy: once a request decodes sparsely (its prefill, or its recomputation after a preemption, is done
and its context reaches ``sparse_from``), every block except the sink blocks and those overlapping the recent window is
copied to the host. ``hot_set_factor x (budget - sinks - recent)`` tokens worth of those blocks (the ones nearest
the end of the prompt) stay allocated on the device as the request's hot set (see ``hotset.py``); the others go
back to vLLM's free pool. Device footprint per decoding request:
``cdiv(sinks, bs) + cdiv(recent, bs) + 1 + hot blocks``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sentencekv_vllm import policies
from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.log import get_logger

logger = get_logger(__name__)
# Set (e.g. to 1) for vllm serve to walk the whole host free list every step (tests do).
CHECK_ENV = "SENTENCEKV_CHECK_SLOTS"


@dataclass
class RequestTier:
    """What the scheduler side knows about one request's residency."""

    sparse_from: int            # context from which decode rows are sparse (``SentenceKVConfig.sparse_from``)
    policy: str
    dense_until: int            # tokens to (re)compute before decoding: prompt, or prompt + output after preemption
    hot_quota: int              # device blocks kept as the hot set (in blocks of the KV pool)
    spilled: set[int] = field(default_factory=set)    # logical blocks with a host copy
    kept: int = 0               # spilled blocks kept on the device (hot set), <= hot_quota


Spill = tuple[str, int, int, int, bool]     # (request, logical block, device block, host slot, kept on device)


@dataclass
class HostHolding:
    """One request's host slots, and the spills to them not yet shipped to the worker.

    Why together: a slot returns to the free list only when its holding is dropped, and the holding's unshipped
    spills are dropped with it, so a slot can never be free while a pending spill targets it (issue #13 item 3:
    a finish/preemption inside one ``schedule()`` used to free a slot whose copy was still queued, and the next
    spill of the same step got the same slot).
    """

    slots: list[int] = field(default_factory=list)
    unshipped: list[Spill] = field(default_factory=list)


@dataclass
class EngineTier:
    cfg: SentenceKVConfig = field(default_factory=SentenceKVConfig)
    host_capacity: int = 0
    free_slots: list[int] = field(default_factory=list)
    requests: dict[str, RequestTier] = field(default_factory=dict)
    holdings: dict[str, HostHolding] = field(default_factory=dict)
    pending_releases: list[str] = field(default_factory=list)
    block_size: int = 16
    full_checks: bool = field(default_factory=lambda: os.environ.get(CHECK_ENV, "") not in ("", "0"))
    violations: int = 0         # slot-invariant violations found by check() since start

    def configure(self, cfg: SentenceKVConfig, host_capacity: int, block_size: int) -> None:
        self.cfg, self.host_capacity, self.block_size = cfg, host_capacity, block_size
        self.free_slots = list(range(host_capacity - 1, -1, -1))
        self.holdings, self.requests, self.pending_releases, self.violations = {}, {}, [], 0

    def on_request(self, req_id: str, extra_args: dict[str, Any] | None, num_tokens: int) -> None:
        """A request is about to be scheduled from position 0 (new, or resumed after a preemption)."""
        try:
            cfg = self.cfg.with_request_overrides(extra_args)
        except ValueError:      # already answered with a 400 by the API server; never fail the engine
            cfg = self.cfg
        quota = -(-int(cfg.hot_set_factor * cfg.selection_budget) // self.block_size)
        self.requests[req_id] = RequestTier(cfg.sparse_from, cfg.policy, num_tokens, quota)

    def spill_range(self, req_id: str, processed: int) -> tuple[int, int]:
        """Logical blocks that may leave the device now: ``[first, last)``; empty while the request is dense."""
        tier = self.requests.get(req_id)
        if tier is None or policies.get(tier.policy).dense or processed < max(tier.dense_until, tier.sparse_from - 1):
            return 0, 0
        first = -(-self.cfg.sinks // self.block_size)
        last = max(first, (processed - self.cfg.recent) // self.block_size)
        return first, last

    def already_spilled(self, req_id: str) -> set[int]:
        tier = self.requests.get(req_id)
        return tier.spilled if tier is not None else set()

    def take_host_slots(self, req_id: str, n: int) -> list[int]:
        """Up to ``n`` free host slots; fewer when the host tier is full (the rest of the blocks stay resident)."""
        if n > len(self.free_slots):
            metrics.observe_host_blocks(self.host_used, full=True)
        n = min(n, len(self.free_slots))
        slots = [self.free_slots.pop() for _ in range(n)]
        if slots:
            self.holdings.setdefault(req_id, HostHolding()).slots.extend(slots)
        return slots

    def keep_on_device(self, req_id: str, spilled: list[int]) -> set[int]:
        """Which of the just-spilled logical blocks stay allocated as hot-set blocks (the last ones first)."""
        tier = self.requests[req_id]
        room = max(0, tier.hot_quota - tier.kept)
        keep = set(spilled[max(0, len(spilled) - room):]) if room else set()
        tier.kept += len(keep)
        return keep

    def record_spill(self, req_id: str, moves: list[tuple[int, int, int, bool]]) -> None:
        """Queue copies to slots this request took with :meth:`take_host_slots` (shipped by :meth:`take_pending`)."""
        self.requests[req_id].spilled.update(logical for logical, *_ in moves)
        self.holdings[req_id].unshipped.extend((req_id, *move) for move in moves)
        metrics.observe_host_blocks(self.host_used, spilled=len(moves))

    def release(self, req_id: str) -> None:
        """Finish, abort or preemption: the request's host slots return to the pool together with its spills not
        yet shipped (its blocks are being freed, nothing will read those copies); the worker forgets the
        request's map. A preempted request is still known here (``forget`` runs first on finish and abort)."""
        holding = self.holdings.pop(req_id, None)
        if holding is None:
            return
        self.free_slots.extend(holding.slots)
        self.pending_releases.append(req_id)
        # still known here only on preemption; on_request starts it afresh when it is rescheduled
        metrics.observe_host_blocks(self.host_used, preempted=req_id in self.requests)

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def take_pending(self) -> tuple[list[Spill], list[str]]:
        """This step's copies and releases for the connector metadata; checks the slot invariant first."""
        self.check(full=self.full_checks)
        spills = [spill for holding in self.holdings.values() for spill in holding.unshipped]
        for holding in self.holdings.values():
            holding.unshipped = []
        releases, self.pending_releases = self.pending_releases, []
        return spills, releases

    def check(self, full: bool = False) -> list[str]:
        """Slot invariant: every slot is free xor held by exactly one request, and every unshipped spill targets a
        distinct slot its request holds. ``full`` also walks the free list (O(capacity)); the default costs
        O(unshipped spills) and runs every step. Violations are logged and counted (metric
        ``sentencekv_slot_invariant_violations_total``), never raised: the engine keeps serving."""
        problems: list[str] = []
        targets: set[int] = set()
        held = 0
        for req_id, holding in self.holdings.items():
            held += len(holding.slots)
            own = set(holding.slots) if holding.unshipped else ()
            for spill in holding.unshipped:
                slot = spill[3]
                if spill[0] != req_id or slot not in own:
                    problems.append(f"spill {spill} targets a slot {req_id} does not hold")
                if slot in targets:
                    problems.append(f"slot {slot} is the target of two pending spills")
                targets.add(slot)
        if held + len(self.free_slots) != self.host_capacity:
            problems.append(f"{held} held + {len(self.free_slots)} free != capacity {self.host_capacity}")
        if full:
            free = set(self.free_slots)
            if len(free) != len(self.free_slots):
                problems.append("a slot is twice in the free list")
            owners: dict[int, str] = {}
            for req_id, holding in self.holdings.items():
                for slot in holding.slots:
                    if slot in free or slot in owners:
                        problems.append(f"slot {slot} of {req_id} is also free or held by {owners.get(slot)}")
                    owners[slot] = req_id
        if problems:
            self.violations += len(problems)
            metrics.observe_slot_violations(len(problems))
            logger.error("SentenceKV host-slot invariant violated: %s", "; ".join(problems[:5]))
        return problems

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
        self.bytes_in = 0

    def spill(self, block_ids: list[int], slots: list[int]) -> None:
        """Copy device blocks to host slots, every layer (before the scheduler's reuse of those blocks)."""
        if not block_ids:
            return
        src = torch.tensor(block_ids, dtype=torch.long)
        dst = torch.tensor(slots, dtype=torch.long)
        for dev, host in zip(self.device_flat, self.pool, strict=True):
            host[dst] = dev[src.to(dev.device)].to("cpu")
            self.bytes_out += host[0].numel() * host.element_size() * len(slots)


    def load(self, layer: int, block_ids: torch.Tensor, slots: torch.Tensor) -> int:
        """Copy host slots into device blocks of one layer (a hot-set swap-in); returns the bytes moved."""
        dev, host = self.device_flat[layer], self.pool[layer]
        dev[block_ids.to(dev.device)] = host[slots.cpu()].to(dev.device, non_blocking=True)
        moved = len(slots) * host.shape[1] * host.element_size()
        self.bytes_in += moved
        return moved


def host_block_bytes(kv_cache_config: Any) -> int:
    """Bytes one logical block takes across all layers (what a host slot must hold)."""
    total = 0
    for group in kv_cache_config.kv_cache_groups:
        total += group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total
