"""Selection policies: one class per file behind :class:`~sentencekv_vllm.policies.base.Policy`, one registry.

The config's ``policy`` values, the per-request compatibility rule (same ``units``), the engine's index build and
the evaluation harness all read this registry; adding a policy is a new file here and one entry below. Pure torch:
nothing in this package imports vLLM or the config module.
"""

from __future__ import annotations

import torch

from sentencekv_vllm.core.selection import SelectionBatch, UnitFeatures
from sentencekv_vllm.policies.base import Policy, PolicyConfig, TokenFeatures
from sentencekv_vllm.policies.full import Full
from sentencekv_vllm.policies.quest import Quest
from sentencekv_vllm.policies.reference import Reference
from sentencekv_vllm.policies.sentencekv import SentenceKV
from sentencekv_vllm.policies.snapkv import SnapKV
from sentencekv_vllm.policies.streaming import Streaming

#: name -> policy, in the order the configuration reference lists them (the first is the default)
REGISTRY: dict[str, Policy] = {p.name: p for p in (
    SentenceKV(),
    Full(),
    Streaming(),
    Quest(),
    SnapKV(),
    Reference(),
)}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Policy:
    """The registered policy called ``name`` (KeyError names the valid ones)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown SentenceKV policy {name!r}; registered: {list(REGISTRY)}") from None


def compatible(request_policy: str, server_policy: str) -> bool:
    """A request may switch to ``request_policy`` on a server running ``server_policy`` when both use the same
    units: the server builds one kind of index (sentences or pages) for every request."""
    return get(request_policy).units == get(server_policy).units


def indexers(units: str) -> list[Policy]:
    """The policies whose unit features a server with these units builds for every request (one per slot owner:
    a request may switch to any of them)."""
    return [p for p in REGISTRY.values() if p.units == units and p.slots]


def pool_slots(units: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Unit-pool slots and open-unit slots of a server with these units (union over its indexers, in order)."""
    slots = dict.fromkeys(s for p in indexers(units) for s in p.slots)
    return tuple(slots), tuple(open_reductions(units))


def open_reductions(units: str) -> dict[str, str]:
    """Open-unit slot -> reduction (``sum`` / ``amin`` / ``amax``) of a server with these units; policies sharing a
    slot must declare the same reduction."""
    out: dict[str, str] = {}
    for p in indexers(units):
        for name, how in p.open_slots.items():
            if out.setdefault(name, how) != how:
                raise ValueError(f"open slot {name!r} declared as {out[name]!r} and {how!r}")
    return out


def describe() -> str:
    """The ``policy`` key's documentation, one line per registered policy (rendered into the README's table)."""
    listed = ", ".join(f"`{p.name}` ({p.summary})" for p in REGISTRY.values())
    by_units: dict[str, list[str]] = {}
    for p in REGISTRY.values():
        by_units.setdefault(p.units, []).append(f"`{p.name}`")
    groups = "; ".join(f"{units}: {', '.join(members)}" for units, members in by_units.items())
    return (f"{listed}; baselines run through the same backend. Per request: `vllm_xargs.sentencekv_policy`, "
            f"among the policies with the server's units ({groups}).")


# -- name-based helpers (tests, benchmarks) ----------------------------------------------------------------

def unit_scores(policy: str, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
    """``[R, Hk, S]`` scores of a scoring policy (``-inf`` = the unit may not be taken by that head)."""
    return get(policy).score(query, feats)


def select(policy: str, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
           details: dict | None = None, tokens: TokenFeatures | None = None) -> torch.Tensor:
    """Token mask ``[R, Hk, T]`` for one layer (``details`` receives scored policies' unit ``scores`` and
    ``allowed`` token counts, for the retrieval trace)."""
    return get(policy).mask(query, feats, batch, details, tokens)


def select_positions(policy: str, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
                     width: int, details: dict | None = None,
                     tokens: TokenFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same selection as :func:`select`, as ascending positions ``[R, Hk, width]`` + valid mask."""
    return get(policy).positions(query, feats, batch, width, details, tokens)


__all__ = ["REGISTRY", "Policy", "PolicyConfig", "TokenFeatures", "compatible", "describe", "get", "indexers",
           "names", "open_reductions", "pool_slots", "select", "select_positions", "unit_scores"]
