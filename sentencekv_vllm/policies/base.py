"""The one abstraction every selection policy implements (pure torch, engine-free).

A policy decides which tokens each KV head of a decoding request attends to. What the engine needs to know about
it, and nothing else, is on :class:`Policy`:

* ``name`` (the config / ``vllm_xargs`` value) and ``summary`` (its line in the configuration reference);
* ``units``: what the prompt is cut into (``"sentences"`` or ``"pages"``). A server keeps one kind of unit, so a
  request may switch to another policy only when the units match;
* ``slots``: per-unit features the policy builds and reads (``[Hk, D]`` float32 rows of the engine's unit pool),
  and ``open_slots``: per-request running statistics of the open (generated) unit, each a declared reduction of
  its keys (``sum`` / ``amin`` / ``amax``, so the engine folds a token in with one indexed op per layer), that
  become those features when the unit closes (:meth:`close_open`); built at prefill by :meth:`build_units`;
* :meth:`build_tokens`: request-level token features built once at prefill (token-eviction policies such as
  SnapKV keep their choice here instead of in the unit pool);
* :meth:`score` (units scored by the decode query) and :meth:`positions` (the tokens a step attends to);
* ``stateful``: the policy keeps its own decode state and chooses per query head (only ``reference``).

Scoring policies only score units; one shared budget filler (``core/selection.py``) turns scores into tokens, the
way kvpress separates ``score`` from the mechanics. The engine glue (``integration/``) reads these attributes and
never branches on a policy's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Protocol

import torch

from sentencekv_vllm.core.selection import (
    NEG_INF,
    SelectionBatch,
    UnitFeatures,
    fill_budget,
    positions_from_allowed,
    token_mask,
)

Tensors = Mapping[str, torch.Tensor]
#: value of an open-unit statistic before its first key, per reduction (``Policy.open_slots``)
OPEN_INIT = {"sum": 0.0, "amin": float("inf"), "amax": float("-inf")}


class PolicyConfig(Protocol):
    """The configuration keys a policy may read (``SentenceKVConfig`` has them all; kept structural so the
    policies do not import the config module, which imports this package for the policy names)."""

    budget: int
    sinks: int
    recent: int
    obs_window: int
    pool_kernel: int
    semantic_budget: int
    keep_unretained: bool


@dataclass
class TokenFeatures:
    """Request-level token features of the rows of a decode group, for one layer.

    order ``[R, Hk, K]``: prompt positions, most important first (``-1`` pads rows with fewer); prompt_lens ``[R]``.
    """

    order: torch.Tensor
    prompt_lens: torch.Tensor


class Policy:
    """Base class: a policy that attends only sinks and the recent window. Subclasses override what they need."""

    name: ClassVar[str]
    summary: ClassVar[str]
    units: ClassVar[str] = "sentences"
    slots: ClassVar[tuple[str, ...]] = ()
    #: running statistic of the open unit -> how each key folds in (a key of ``OPEN_INIT``)
    open_slots: ClassVar[Mapping[str, str]] = {}
    #: every decode row runs on the stock kernel (no selection at all)
    dense: ClassVar[bool] = False
    #: its selection is whole units, so the block-granular path (``attention: paged``) can express it
    paged: ClassVar[bool] = True
    #: :meth:`score` reads the decode query (the engine keeps the open sentence's query sum for it)
    uses_query: ClassVar[bool] = False
    #: :meth:`raw_score` is the dot product of the query sum with the first feature slot, which the native CPU
    #: block selection computes itself (``sentencekv_vllm/native``)
    dot_score: ClassVar[bool] = False
    #: :meth:`build_tokens` returns features the decode step needs (``positions(..., tokens=...)``)
    token_level: ClassVar[bool] = False
    #: keeps its own per-request, per-layer decode state instead of the shared pools (the authors' code,
    #: ``reference.py``): the engine calls ``init_state(keys, obs, punct, cfg)`` at prefill and
    #: ``step(state, query, key, position, punct, cfg)`` for every decode token, which returns the positions each
    #: *query* head attends; every decode row of such a policy takes that path, whatever its context length
    stateful: ClassVar[bool] = False

    # -- prefill -------------------------------------------------------------------------------------------

    def build_units(self, keys: torch.Tensor, spans: torch.Tensor, obs: torch.Tensor | None,
                    cfg: PolicyConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features of the prompt's units for one layer: ``{slot: [S, Hk, D]}`` and valid ``[S, Hk]``.

        keys ``[T, Hk, D]`` post-RoPE prompt keys; spans ``[S, 2]``; obs ``[W, Hq, D]`` the last prompt queries
        (SnapKV's observation window) or None when none were captured.
        """
        return {}, torch.ones(len(spans), keys.shape[1], dtype=torch.bool, device=keys.device)

    def build_tokens(self, keys: torch.Tensor, obs: torch.Tensor | None, cfg: PolicyConfig) -> torch.Tensor | None:
        """Request-level token features for one layer (``[Hk, K]``), or None (the default: the policy has none)."""
        return None

    # -- decode: the open unit -----------------------------------------------------------------------------

    def update_open(self, open_rows: Tensors, key: torch.Tensor, reset: torch.Tensor) -> dict[str, torch.Tensor]:
        """The declared reductions as a pure function (the reference the engine's in-place fold is held to):
        statistics of the open units after this token. open_rows ``{slot: [Rd, Hk, D]}``, key ``[Rd, Hk, D]``
        float32, reset ``[Rd]`` bool (this token starts a new unit)."""
        out = {}
        r = reset.view(-1, *([1] * (key.dim() - 1)))
        for name, how in self.open_slots.items():
            old = torch.where(r, torch.full_like(key, OPEN_INIT[how]), open_rows[name])
            out[name] = old + key if how == "sum" else (torch.minimum if how == "amin" else torch.maximum)(old, key)
        return out

    def close_open(self, open_rows: Tensors, count: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features ``{slot: [..., Rc, Hk, D]}`` of units that just closed, from their running statistics (any
        leading dims: the engine closes every layer at once); count ``[Rc]`` float tokens in each."""
        return {}

    # -- selection -----------------------------------------------------------------------------------------

    def features(self, units: Tensors, valid: torch.Tensor, scratch: bool = False) -> UnitFeatures:
        """The pool rows of this policy's slots as the scorer's :class:`UnitFeatures` (first slot ``a``, second
        ``b``); ``scratch``: they are copies the scorer may overwrite."""
        a, *rest = (units[s] for s in self.slots)
        return UnitFeatures(a, valid, rest[0] if rest else None, scratch=scratch)

    def score(self, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
        """``[R, Hk, S]`` unit scores (``-inf`` = never take: ``feats.valid`` false). query ``[R, Hk, D]``."""
        return self.raw_score(query, feats).masked_fill(~feats.valid.transpose(1, 2), NEG_INF)

    def raw_score(self, query: torch.Tensor, feats: UnitFeatures) -> torch.Tensor:
        """``[R, Hk, S]`` unit scores before ``feats.valid`` is applied (the paged decode path masks them while
        copying them into its workspace, ``core.blocks.block_scores``)."""
        raise NotImplementedError(f"policy {self.name!r} does not score units")

    def allowed(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
                details: dict | None = None) -> tuple[SelectionBatch, torch.Tensor]:
        """The effective batch (a policy may widen the recent window) and allowed tokens per unit ``[R, Hk, S]``.
        Default: units in score order until ``budget - sinks - recent`` tokens are used."""
        assert query is not None and feats is not None, f"policy {self.name!r} scores units with the query"
        scores = self.score(query, feats)
        _, lengths = batch.clipped()
        scores = scores.masked_fill((lengths == 0)[:, None, :], NEG_INF)
        room = (batch.budget - batch.sinks - batch.recent).clamp(min=0)
        allowed = fill_budget(scores, lengths, room)
        if details is not None:
            details.update(scores=scores, allowed=allowed)
        return batch, allowed

    def positions(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch, width: int,
                  details: dict | None = None, tokens: TokenFeatures | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attended positions ``[R, Hk, width]`` ascending, and their valid mask (the decode hot path)."""
        eff, allowed = self.allowed(query, feats, batch, details)
        return positions_from_allowed(eff, allowed, width)

    def mask(self, query: torch.Tensor | None, feats: UnitFeatures | None, batch: SelectionBatch,
             details: dict | None = None, tokens: TokenFeatures | None = None) -> torch.Tensor:
        """The same selection as a ``[R, Hk, T]`` token mask (the reference the tests hold the fast path to)."""
        eff, allowed = self.allowed(query, feats, batch, details)
        return token_mask(eff, allowed)


def no_units(batch: SelectionBatch, hk: int) -> torch.Tensor:
    """Allowed tokens ``[R, hk, S]`` of a policy that takes no unit (all zero)."""
    return torch.zeros(batch.seq_lens.shape[0], hk, batch.starts.shape[1], dtype=torch.long,
                       device=batch.seq_lens.device)
