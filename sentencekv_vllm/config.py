"""One validated configuration object for every SentenceKV hyper-parameter.

The same key names are used everywhere: the core's Python API, ``--additional-config '{"sentencekv": {...}}'``,
``configs/*.yaml`` and the per-request ``vllm_xargs`` overrides (prefixed ``sentencekv_``). Validation happens once,
at start-up in the API server, so a typo fails before any process is spawned and the message names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

POLICIES = ("sentencekv", "full", "streaming", "quest")
SEGMENTATION_MODES = ("punct", "spacy")
OFFLOAD_MODES = ("none", "host")
ADDITIONAL_CONFIG_KEY = "sentencekv"
REQUEST_ARG_PREFIX = "sentencekv_"
# Keys a request may override through ``vllm_xargs`` (``sentencekv_budget``, ``sentencekv_policy``).
REQUEST_OVERRIDABLE = ("budget", "policy")


class SentenceKVConfigError(ValueError):
    """Raised for an invalid hyper-parameter; the message always starts with the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"sentencekv.{key}: {message}")


@dataclass(frozen=True)
class SentenceKVConfig:
    """Hyper-parameters of sentence-level KV selection.

    budget: token budget tau attended per decode step (sinks + recent + selected sentences).
    semantic_factor: r; SnapKV keeps ``budget * r`` important tokens per KV head to build sentence centroids.
    sinks / recent: tokens always attended at the start / end of the context.
    policy: ``sentencekv`` | ``full`` | ``streaming`` | ``quest`` (baselines run through the same backend).
    segmentation: ``punct`` (token-id boundaries, also used on generated text) | ``spacy`` (prompt only).
    spacy_model: ``blank`` (``spacy.blank("en")`` + sentencizer) or an installed pipeline name.
    min_sentence_len / max_sentence_len: merge shorter sentences into the next, split longer ones.
    obs_window / pool_kernel: SnapKV observation window (last prompt queries) and 1-D pooling kernel.
    quest_page_size: page size (tokens) of the ``quest`` baseline.
    keep_unretained: sentences with no SnapKV-retained token stay retrievable (centroid over all their keys);
        ``False`` reproduces the reference code, which discards them.
    offload: ``none`` | ``host`` (two-tier memory; see README).
    host_pool_gib: size of the host tier when ``offload == "host"``.
    hot_set_factor: with ``offload == "host"``, each sparse request keeps ``hot_set_factor x (budget - sinks -
        recent)`` tokens (rounded up to blocks) of its own device blocks as a hot set caching host blocks its
        recent selections used; 0 = every selected host token is read from the host each step.
    stats: collect per-step statistics (attended tokens, selection time) for metrics.
    trace_requests: retrieval trace ring size (0 = off): the last N finished requests' sentences and what each
        generated sentence retrieved, for the inspector endpoints (``/sentencekv/...``).
    """

    budget: int = 1024
    semantic_factor: float = 2.0
    sinks: int = 32
    recent: int = 32
    policy: str = "sentencekv"
    segmentation: str = "punct"
    spacy_model: str = "blank"
    min_sentence_len: int = 4
    max_sentence_len: int = 128
    obs_window: int = 32
    pool_kernel: int = 7
    quest_page_size: int = 16
    keep_unretained: bool = True
    offload: str = "none"
    host_pool_gib: float = 4.0
    hot_set_factor: float = 1.0
    stats: bool = True
    trace_requests: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    @property
    def selection_budget(self) -> int:
        """Tokens left for sentences once sinks and the recent window are in."""
        return self.budget - self.sinks - self.recent

    @property
    def semantic_budget(self) -> int:
        """SnapKV retention pool per KV head: ``budget * semantic_factor`` tokens."""
        return int(self.budget * self.semantic_factor)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SentenceKVConfig":
        """Build from a user mapping, rejecting unknown keys by name."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise SentenceKVConfigError(key, f"unknown key; valid keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "SentenceKVConfig":
        """Read ``vllm_config.additional_config["sentencekv"]`` (missing -> defaults)."""
        if not additional_config:
            return cls()
        if not isinstance(additional_config, Mapping):
            raise SentenceKVConfigError("<root>", "--additional-config must be a JSON object")
        section = additional_config.get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(section, Mapping):
            raise SentenceKVConfigError("<root>", f"'{ADDITIONAL_CONFIG_KEY}' must be a JSON object")
        return cls.from_dict(section)

    def with_request_overrides(self, extra_args: Mapping[str, Any] | None) -> "SentenceKVConfig":
        """Apply ``sentencekv_budget`` / ``sentencekv_policy`` from a request's ``vllm_xargs``."""
        if not extra_args:
            return self
        overrides: dict[str, Any] = {}
        for key, value in extra_args.items():
            if not key.startswith(REQUEST_ARG_PREFIX):
                continue
            name = key[len(REQUEST_ARG_PREFIX):]
            if name not in REQUEST_OVERRIDABLE:
                raise SentenceKVConfigError(name, f"cannot be set per request; allowed: {list(REQUEST_OVERRIDABLE)}")
            overrides[name] = value
        return dataclasses.replace(self, **overrides) if overrides else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_INT_KEYS = ("budget", "sinks", "recent", "min_sentence_len", "max_sentence_len", "obs_window", "pool_kernel",
             "quest_page_size", "trace_requests")
_FLOAT_KEYS = ("semantic_factor", "host_pool_gib", "hot_set_factor")
_BOOL_KEYS = ("keep_unretained", "stats")
_CHOICES = {"policy": POLICIES, "segmentation": SEGMENTATION_MODES, "offload": OFFLOAD_MODES}


def _check_types(cfg: SentenceKVConfig) -> None:
    for key in _INT_KEYS:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SentenceKVConfigError(key, f"must be an integer, got {value!r}")
    for key in _FLOAT_KEYS:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SentenceKVConfigError(key, f"must be a number, got {value!r}")
    for key in _BOOL_KEYS:
        if not isinstance(getattr(cfg, key), bool):
            raise SentenceKVConfigError(key, f"must be true or false, got {getattr(cfg, key)!r}")
    for key in (*_CHOICES, "spacy_model"):
        if not isinstance(getattr(cfg, key), str):
            raise SentenceKVConfigError(key, f"must be a string, got {getattr(cfg, key)!r}")


def _check_values(cfg: SentenceKVConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise SentenceKVConfigError(key, f"must be one of {list(choices)}, got {getattr(cfg, key)!r}")
    for key in ("budget", "min_sentence_len", "max_sentence_len", "obs_window", "pool_kernel", "quest_page_size"):
        if getattr(cfg, key) <= 0:
            raise SentenceKVConfigError(key, f"must be > 0, got {getattr(cfg, key)}")
    for key in ("sinks", "recent", "trace_requests"):
        if getattr(cfg, key) < 0:
            raise SentenceKVConfigError(key, f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.budget <= cfg.sinks + cfg.recent:
        raise SentenceKVConfigError(
            "budget", f"must exceed sinks + recent ({cfg.sinks} + {cfg.recent}), got {cfg.budget}")
    if cfg.semantic_factor < 1:
        raise SentenceKVConfigError("semantic_factor", f"must be >= 1, got {cfg.semantic_factor}")
    if cfg.min_sentence_len > cfg.max_sentence_len:
        raise SentenceKVConfigError(
            "min_sentence_len", f"must be <= max_sentence_len ({cfg.max_sentence_len}), got {cfg.min_sentence_len}")
    if cfg.pool_kernel % 2 == 0:
        raise SentenceKVConfigError("pool_kernel", f"must be odd, got {cfg.pool_kernel}")
    if cfg.hot_set_factor < 0:
        raise SentenceKVConfigError("hot_set_factor", f"must be >= 0, got {cfg.hot_set_factor}")
    if cfg.host_pool_gib <= 0:
        raise SentenceKVConfigError("host_pool_gib", f"must be > 0, got {cfg.host_pool_gib}")


__all__ = ["SentenceKVConfig", "SentenceKVConfigError", "POLICIES", "SEGMENTATION_MODES"]
