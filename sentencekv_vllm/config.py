"""One validated configuration object for every SentenceKV hyper-parameter.

The same key names are used everywhere: the core's Python API, ``--additional-config '{"sentencekv": {...}}'``,
``configs/*.yaml`` and the per-request ``vllm_xargs`` overrides (prefixed ``sentencekv_``). Validation happens once,
at start-up in the API server, so a typo fails before any process is spawned and the message names the key.

The model is a frozen, strict pydantic model (pydantic v2 comes with vLLM): strict so that ``true`` is not an
integer and ``"512"`` is not a budget, as before; every pydantic error is turned into a
:class:`SentenceKVConfigError` that starts with the key. The field descriptions are the documentation: the README's
configuration table and ``docs/config.schema.json`` are generated from them
(``python -m sentencekv_vllm.config --markdown`` / ``--schema``; a test keeps both in sync).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from typing import Any, Literal, Mapping, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sentencekv_vllm import policies

# the registered policies (``sentencekv_vllm/policies/``), in registry order; the first is the default
Policy = Literal[policies.names()]  # type: ignore[valid-type]
Segmentation = Literal["punct", "spacy"]
Offload = Literal["none", "host"]
Attention = Literal["auto", "paged", "exact"]
POLICIES = get_args(Policy)
SEGMENTATION_MODES = get_args(Segmentation)
OFFLOAD_MODES = get_args(Offload)
ATTENTION_MODES = get_args(Attention)
# ``auto`` attends whole blocks (paged) once the budget spans at least this many of them; below, exact tokens.
PAGED_MIN_BLOCKS = 8
ADDITIONAL_CONFIG_KEY = "sentencekv"
REQUEST_ARG_PREFIX = "sentencekv_"
# Keys a request may override through ``vllm_xargs`` (``sentencekv_budget``, ``sentencekv_policy``, ...).
REQUEST_OVERRIDABLE = ("budget", "policy", "dense_below")
# Per-request flags that are not hyper-parameters (``vllm_xargs.sentencekv_trace: true``): validated here, read by
# the worker (:func:`sentencekv_vllm.integration.trace.wanted`).
REQUEST_FLAGS = ("trace",)
# Bound of the trace ring: one trace is itself bounded (``integration/trace.py``), so the ring's memory is too.
MAX_TRACE_REQUESTS = 256
# under vLLM's logger tree (its handlers and format) without importing vLLM here
_LOGGER = logging.getLogger("vllm.plugins.sentencekv_vllm.config")


class SentenceKVConfigError(ValueError):
    """Raised for an invalid hyper-parameter; the message always starts with the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"sentencekv.{key}: {message}")


class SentenceKVConfig(BaseModel):
    """Hyper-parameters of sentence-level KV selection (one description per field below; they are rendered into
    the README's configuration table and the JSON schema).

    Frozen and hashable; build it with ``SentenceKVConfig(...)``, :meth:`from_dict` or
    :meth:`from_additional_config`, derive variants with :meth:`replace` (validated) rather than
    ``model_copy(update=...)`` (which pydantic does not validate).
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", validate_default=False,
                              title="SentenceKV configuration")

    budget: int = Field(1024, gt=0, description=(
        "τ: tokens attended per decode step and KV head (sinks + recent + selected sentences); must exceed "
        "`sinks + recent`. Per request: `vllm_xargs.sentencekv_budget`."))
    semantic_factor: float = Field(2.0, ge=1, description=(
        "r: SnapKV keeps `budget * r` important prompt tokens per KV head; sentence centroids average those."))
    sinks: int = Field(32, ge=0, description="Always-attended first tokens (attention sinks).")
    recent: int = Field(32, ge=0, description="Always-attended last tokens (recent window).")
    policy: Policy = Field(policies.names()[0], description=policies.describe())
    segmentation: Segmentation = Field("punct", description=(
        "`punct` (token-id boundaries, prompt and generated text) or `spacy` (prompt: spaCy sentencizer, better "
        "on \"Dr.\", \"p.m.\"; generated text: the punct rules)."))
    spacy_model: str = Field("blank", description=(
        "`blank` (`spacy.blank(\"en\")` + sentencizer), or an installed spaCy pipeline's name or a saved "
        "pipeline's directory (anything `spacy.load` accepts). With `segmentation: spacy` the worker loads it at "
        "start-up, and a name that is neither is refused before any engine process starts."))
    min_sentence_len: int = Field(4, gt=0, description=(
        "Shorter sentences are merged into the next one; at most `max_sentence_len`."))
    max_sentence_len: int = Field(128, gt=0, description="Longer sentences are split.")
    obs_window: int = Field(32, gt=0, description="SnapKV observation window: the last prompt queries scored.")
    pool_kernel: int = Field(7, gt=0, description="SnapKV 1-D pooling kernel (odd).")
    index_tokens_per_unit: int = Field(16, gt=0, description=(
        "The sentence index (centroids on the device, in the model's dtype if it is bf16 / fp16, else float32) is "
        "allocated at start-up for every token the KV pools can hold (device + host tier) at one sentence per this "
        "many tokens, and taken off vLLM's KV memory (about 1/32 of it at the default: a centroid is half of one "
        "token's K and V). Text whose "
        "sentences are shorter on average outgrows it; the index then grows in 25% steps outside vLLM's budget "
        "(logged)."))
    quest_page_size: int = Field(16, gt=0, description="Page size (tokens) of the `quest` baseline.")
    keep_unretained: bool = Field(True, description=(
        "Sentences with no SnapKV-retained token stay retrievable (centroid over all their keys); `false` makes "
        "them unselectable, as the reference code does (which also attends only the retained tokens of a "
        "selected sentence: policy `reference` does that)."))
    offload: Offload = Field("none", description="`host`: two-tier KV memory (see \"Two-tier memory\").")
    host_pool_gib: float | None = Field(None, gt=0, description=(
        "Size of the host tier in GiB when `offload` is `host`. Default: half of the RAM available at start-up (on "
        "a CPU server less the KV cache, same RAM), at most what every request's whole context needs."))
    host_prefault: bool = Field(False, description=(
        "With `offload: host` on CPU: fault the host tier's pages in at start-up, as vLLM's own CPU offloading does "
        "with its region, so that no spill pays for the first touch of its host slots (measured up to ~1.5 s for a "
        "7.5k-token request's first spill, docs/eval/perf); commits `host_pool_gib` of RAM and adds its page-fault "
        "time to start-up. A CUDA host tier is pinned, hence resident, anyway."))
    hot_set_factor: float = Field(1.0, ge=0, description=(
        "With `offload: host`, each sparse request keeps `hot_set_factor x (budget - sinks - recent)` tokens "
        "(rounded up to blocks) of its own device blocks as a hot set caching host blocks its recent selections "
        "used; 0 = every selected host token is read from the host each step. Below 1 a step whose selection does "
        "not fit the hot set runs the exact path with token-wise host reads: fewer device blocks, slower decode "
        "(0.25 at 7.9k: ITL median 370 vs 56 ms, docs/eval/memory)."))
    attention: Attention = Field("auto", description=(
        "How a sparse decode step attends the chosen sentences. `paged`: the blocks that hold them, read in place "
        "by the stock paged kernel (no copy; `budget // block_size` blocks per KV head); `exact`: exactly the "
        "chosen tokens, gathered and attended with an exact softmax (the reference; slower); `auto`: `paged` "
        f"where the backend supports it and the budget spans >= {PAGED_MIN_BLOCKS} blocks, else `exact`."))
    dense_below: float = Field(2.5, ge=1, description=(
        "A decode row attends sparsely once its context reaches `dense_below x budget` tokens (and exceeds the "
        "budget); below that the stock kernel attends the whole context, because selection there skips too little "
        "to pay for its own cost: on CPU sparse pays from ~2.5x the budget for a single stream and from ~2x at "
        "batch 8 (docs/eval/perf). `1` = sparse as soon as the context exceeds the budget. Per request: "
        "`vllm_xargs.sentencekv_dense_below`."))
    stats: bool = Field(True, description=(
        "Collect per-step statistics (attended tokens, selection time) for metrics."))
    trace_requests: int = Field(0, ge=0, le=MAX_TRACE_REQUESTS, description=(
        "Retrieval trace ring size (0 = off, no cost): every request is traced and the newest N finished traces "
        "are kept in the worker's memory for the inspector (`/sentencekv/...`)."))
    trace_per_request: bool = Field(True, description=(
        "A request may ask for its own trace with `vllm_xargs.sentencekv_trace: true` (or opt out with `false`) "
        "even when `trace_requests` is 0; kept in the same in-memory ring (`trace_requests` entries, or 8 when that "
        "is 0). `false`: such requests are refused (400)."))
    trace_dir: str | None = Field(None, description=(
        "Also write each finished trace as `<request id>.json` into this directory (newest ring-size files "
        "kept). Default: traces stay in memory only, nothing is written to disk."))

    @model_validator(mode="after")
    def _check_relations(self) -> "SentenceKVConfig":
        """Checks that involve more than one key; each still names the key to change."""
        if self.budget <= self.sinks + self.recent:
            _fail("budget", f"must exceed sinks + recent ({self.sinks} + {self.recent}), got {self.budget}")
        if self.min_sentence_len > self.max_sentence_len:
            _fail("min_sentence_len",
                  f"must be <= max_sentence_len ({self.max_sentence_len}), got {self.min_sentence_len}")
        if policies.get(self.policy).stateful and self.offload == "host":
            _fail("policy", f"{self.policy!r} reads the device cache only; it cannot run with offload: 'host'")
        if self.pool_kernel % 2 == 0:
            _fail("pool_kernel", f"must be odd, got {self.pool_kernel}")
        if self.trace_dir is not None and not self.trace_dir.strip():
            _fail("trace_dir", "must be a directory path or null, got an empty string")
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _config_error(err) from None

    @property
    def selection_budget(self) -> int:
        """Tokens left for sentences once sinks and the recent window are in."""
        return self.budget - self.sinks - self.recent

    @property
    def sparse_from(self) -> int:
        """Context (tokens, the current one included) from which a decode row attends sparsely."""
        return max(self.budget + 1, math.ceil(self.dense_below * self.budget))

    @property
    def semantic_budget(self) -> int:
        """SnapKV retention pool per KV head: ``budget * semantic_factor`` tokens."""
        return int(self.budget * self.semantic_factor)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SentenceKVConfig":
        """Build from a user mapping, rejecting unknown keys by name."""
        if values is not None and not isinstance(values, Mapping):
            raise SentenceKVConfigError("<root>", f"'{ADDITIONAL_CONFIG_KEY}' must be a JSON object")
        return cls(**{str(k): v for k, v in (values or {}).items()})

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

    def replace(self, **changes: Any) -> "SentenceKVConfig":
        """A validated copy with ``changes`` (``model_copy(update=...)`` would skip validation)."""
        return type(self)(**{**self.model_dump(), **changes}) if changes else self

    def with_request_overrides(self, extra_args: Mapping[str, Any] | None) -> "SentenceKVConfig":
        """Apply ``sentencekv_budget`` / ``sentencekv_policy`` from a request's ``vllm_xargs``; per-request flags
        (``sentencekv_trace``) are checked here but are not hyper-parameters."""
        if not extra_args:
            return self
        overrides: dict[str, Any] = {}
        for key, value in extra_args.items():
            if not key.startswith(REQUEST_ARG_PREFIX):
                continue
            name = key[len(REQUEST_ARG_PREFIX):]
            if name in REQUEST_FLAGS:
                self._check_flag(name, value)
                continue
            if name not in REQUEST_OVERRIDABLE:
                raise SentenceKVConfigError(
                    name, f"cannot be set per request; allowed: {list(REQUEST_OVERRIDABLE + REQUEST_FLAGS)}")
            overrides[name] = value
        return self.replace(**overrides)

    def _check_flag(self, name: str, value: Any) -> None:
        if request_flag(value) is None:
            raise SentenceKVConfigError(name, f"must be true or false, got {value!r}")
        if name == "trace" and value and not self.trace_per_request:
            raise SentenceKVConfigError(name, "per-request traces are off on this server (trace_per_request: false)")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def resolve_request(server: SentenceKVConfig, extra_args: Mapping[str, Any] | None,
                    max_model_len: int | None = None) -> SentenceKVConfig:
    """A request's effective config: the server's with the request's ``vllm_xargs.sentencekv_*`` overrides, by the
    same rules as the server config, plus: the budget fits ``max_model_len`` (when given) and the policy uses the
    server's units (``policies.compatible``: sentences vs pages). Raises :class:`SentenceKVConfigError` naming the
    key; the API server turns it into a 400 before the request reaches the engine."""
    req = server.with_request_overrides(extra_args)
    if max_model_len is not None and req.budget > max_model_len:
        raise SentenceKVConfigError("budget", f"must be <= max_model_len ({max_model_len}), got {req.budget}")
    if not policies.compatible(req.policy, server.policy):
        raise SentenceKVConfigError("policy", f"{req.policy!r} cannot be requested on a server running policy "
                                    f"{server.policy!r} (different index units)")
    return req


def resolve_request_or_server(server: SentenceKVConfig, extra_args: Mapping[str, Any] | None) -> SentenceKVConfig:
    """:func:`resolve_request` for EngineCore and the worker, which must never fail a batch: a request the API
    server did not check (offline ``vllm.LLM``) with invalid overrides runs with the server's config, logged."""
    try:
        return resolve_request(server, extra_args)
    except SentenceKVConfigError as err:
        _LOGGER.warning("ignoring the request's SentenceKV overrides: %s", err)
        return server


def request_flag(value: Any) -> bool | None:
    """A per-request boolean flag, or ``None`` if ``value`` is not one. vLLM's ``vllm_xargs`` schema (``str | int |
    float | list``) turns JSON ``true`` into ``1`` before any plugin sees it, so ``1`` / ``0`` count as booleans."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    return None


def _fail(key: str, message: str) -> None:
    """Raise a relation error that :func:`_config_error` turns into ``sentencekv.<key>: <message>``."""
    raise PydanticCustomError("sentencekv", "{message}", {"key": key, "message": message})


# pydantic error type -> message after "sentencekv.<key>: " (today's wording; ``{input!r}`` etc. from the error).
_MESSAGES = {
    "int_type": "must be an integer, got {input!r}",
    "float_type": "must be a number, got {input!r}",
    "bool_type": "must be true or false, got {input!r}",
    "string_type": "must be a string, got {input!r}",
    "literal_error": "must be one of {choices}, got {input!r}",
    "greater_than": "must be > {gt}, got {input!r}",
    "greater_than_equal": "must be >= {ge}, got {input!r}",
    "less_than_equal": "must be <= {le}, got {input!r}",
    "extra_forbidden": "unknown key; valid keys are {keys}",
}


def _config_error(err: ValidationError) -> SentenceKVConfigError:
    """The first error of ``err``, worded like the hand-written checks it replaced, naming its key."""
    first = err.errors(include_url=False)[0]
    ctx = first.get("ctx") or {}
    if first["type"] == "sentencekv":
        return SentenceKVConfigError(ctx["key"], ctx["message"])
    key = str(first["loc"][0]) if first["loc"] else "<root>"
    template = _MESSAGES.get(first["type"])
    if template is None:
        return SentenceKVConfigError(key, f"{first['msg']}, got {first.get('input')!r}")
    return SentenceKVConfigError(key, template.format(
        input=first.get("input"), choices=list(_choices(key)), keys=sorted(SentenceKVConfig.model_fields), **ctx))


def _choices(key: str) -> tuple[str, ...]:
    field = SentenceKVConfig.model_fields.get(key)
    return get_args(field.annotation) if field is not None else ()


# -- documentation generated from the model -----------------------------------------------------------------

def json_schema() -> dict[str, Any]:
    """JSON schema of the ``sentencekv`` section (committed as ``docs/config.schema.json``)."""
    schema = SentenceKVConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = ("The `sentencekv` section of vLLM's --additional-config. Generated by "
                             "`python -m sentencekv_vllm.config --schema`; do not edit.")
    return schema


def markdown_table() -> str:
    """The README's configuration table: key, type, default, meaning."""
    rows = ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
    for name, field in SentenceKVConfig.model_fields.items():
        rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field.default)} | "
                    f"{_bounds(field.metadata)} | {_one_line(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _bounds(metadata: list[Any]) -> str:
    """``> 0``, ``0 … 256`` etc. from the field's constraints (cross-key rules are in the descriptions)."""
    found = {kind: getattr(m, kind) for m in metadata for kind in ("gt", "ge", "le") if hasattr(m, kind)}
    low = f"> {found['gt']}" if "gt" in found else f">= {found['ge']}" if "ge" in found else ""
    if "le" in found:
        return f"{found.get('ge', found.get('gt'))} … {found['le']}" if "ge" in found else f"<= {found['le']}"
    return low


def _type_name(annotation: Any) -> str:
    choices = get_args(annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return " \\| ".join(f"`{c}`" for c in choices)
    names = {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}
    if choices:
        return " or ".join(names.get(c, str(c)) for c in choices)
    return names.get(annotation, str(annotation))


def _default(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentencekv_vllm.config",
                                     description="Print SentenceKV's configuration reference.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="the README's configuration table")
    group.add_argument("--schema", action="store_true", help="the JSON schema (docs/config.schema.json)")
    args = parser.parse_args(argv)
    schema = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    sys.stdout.write(markdown_table() if args.markdown else schema)
    return 0


__all__ = ["SentenceKVConfig", "SentenceKVConfigError", "POLICIES", "SEGMENTATION_MODES", "json_schema",
           "markdown_table"]

if __name__ == "__main__":
    raise SystemExit(main())
