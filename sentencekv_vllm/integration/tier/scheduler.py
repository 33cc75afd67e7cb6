"""Scheduler side of the host tier (EngineCore process): the single authority on host slots.

:class:`EngineTier` (one instance, ``ENGINE``) knows each request's budget/policy, decides which blocks leave the
device (through ``kv_spec.SentenceKVManager``), assigns host slots and queues the copies for the worker; they reach
it as :class:`~sentencekv_vllm.integration.tier.messages.Spill` records in the KV connector's metadata. The worker
side (``host_pool.py``) performs them before the step's forward, i.e. before a freed block can be reused.

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

from sentencekv_vllm import policies
from sentencekv_vllm.config import SentenceKVConfig, resolve_request_or_server
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.tier.messages import Spill

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
    block_size: int = 16
    full_checks: bool = field(default_factory=lambda: os.environ.get(CHECK_ENV, "") not in ("", "0"))
    violations: int = 0         # slot-invariant violations found by check() since start

    def configure(self, cfg: SentenceKVConfig, host_capacity: int, block_size: int) -> None:
        self.cfg, self.host_capacity, self.block_size = cfg, host_capacity, block_size
        self.free_slots = list(range(host_capacity - 1, -1, -1))
        self.holdings, self.requests, self.violations = {}, {}, 0

    def on_request(self, req_id: str, extra_args: dict[str, Any] | None, num_tokens: int) -> None:
        """A request is about to be scheduled from position 0 (new, or resumed after a preemption)."""
        cfg = resolve_request_or_server(self.cfg, extra_args)
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
        self.holdings[req_id].unshipped.extend(Spill(req_id, *move) for move in moves)
        metrics.observe_host_blocks(self.host_used, spilled=len(moves))

    def release(self, req_id: str) -> None:
        """Finish, abort or preemption: the request's host slots return to the pool together with its spills not
        yet shipped (its blocks are being freed, nothing will read those copies). The worker needs no message:
        it drops a request's host map with its state. A preempted request is still known here (``forget`` runs
        first on finish and abort)."""
        holding = self.holdings.pop(req_id, None)
        if holding is None:
            return
        self.free_slots.extend(holding.slots)
        # still known here only on preemption; on_request starts it afresh when it is rescheduled
        metrics.observe_host_blocks(self.host_used, preempted=req_id in self.requests)

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def take_pending(self) -> list[Spill]:
        """This step's copies for the connector metadata; checks the slot invariant first."""
        self.check(full=self.full_checks)
        spills = [spill for holding in self.holdings.values() for spill in holding.unshipped]
        for holding in self.holdings.values():
            holding.unshipped = []
        return spills

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
                slot = spill.slot
                if spill.req_id != req_id or slot not in own:
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
