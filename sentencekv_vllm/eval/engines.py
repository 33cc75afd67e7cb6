"""The engines an evaluation talks to: one real ``vllm serve`` per backend started on demand, or servers that are
already running anywhere (``--base-url``: a GPU box, a stock vLLM, any OpenAI-compatible endpoint).

FULL is the stock backend (not SentenceKV with policy ``full``) when the harness starts the servers, so every
comparison is against unmodified vLLM. The policies come from the registry (``sentencekv_vllm/policies``); those
with sentence units (``sentencekv``, ``streaming``, ...) share one SentenceKV server (per-request ``vllm_xargs``
policy); ``quest`` needs its own server because its index units are pages. Servers run one at a time
(2-core machines). Against a running server every policy is chosen per request through ``vllm_xargs``, and FULL goes
to ``--full-base-url`` when given (a stock server), else to the same server with ``sentencekv_policy: full``.
"""

from __future__ import annotations

import json
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import openai
import requests

from sentencekv_vllm import policies
from sentencekv_vllm.eval.launch import vllm_server

# every registered policy, FULL first (the reference every table compares against)
POLICIES = ("full", *(p for p in policies.names() if p != "full"))
LOCAL_SERVED_NAME = "model"


@dataclass
class Endpoint:
    """Where an OpenAI-compatible server answers: base URL (without ``/v1``), key and served model name."""

    url: str
    api_key: str = "none"
    model: str = LOCAL_SERVED_NAME

    @property
    def v1(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def metrics(self) -> str:
        """The Prometheus exposition (empty when the server has none, e.g. a non-vLLM endpoint)."""
        try:
            res = requests.get(self.url.rstrip("/") + "/metrics", timeout=30,
                               headers={"Authorization": f"Bearer {self.api_key}"})
            return res.text if res.ok else ""
        except requests.RequestException:
            return ""


@dataclass
class EngineSpec:
    """How to start the servers (ignored for the policies that go to a running server)."""

    model: str
    budget: int = 512
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    enforce_eager: bool = True   # CPU compilation costs minutes per server; `--no-enforce-eager` turns it on
    extra_args: list[str] = field(default_factory=list)
    skv_config: dict[str, Any] = field(default_factory=dict)
    base_url: str | None = None
    full_base_url: str | None = None
    api_key: str = "none"
    served_model: str | None = None

    def server_args(self, policy: str) -> list[str]:
        args = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--served-model-name", LOCAL_SERVED_NAME, *self.extra_args]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if policy != "full":
            cfg = {"budget": self.budget, "policy": policy, **self.skv_config}
            args += ["--attention-backend", "sentencekv", "--additional-config", json.dumps({"sentencekv": cfg})]
        return args

    @property
    def remote(self) -> bool:
        return self.base_url is not None

    def endpoint(self, policy: str) -> Endpoint:
        """The running server a policy goes to (only when ``remote``)."""
        url = self.full_base_url if policy == "full" and self.full_base_url else self.base_url
        return Endpoint(url or "", self.api_key, self.served_model or self.model)


def parse_server_args(text: str) -> list[str]:
    """``--server-args "--block-size 16 --gpu-memory-utilization 0.8"`` -> argv list (shell quoting rules)."""
    return shlex.split(text or "")


def server_group(policy: str) -> str:
    """The server a policy runs on when the harness starts them: FULL on stock vLLM, the sentence policies on one
    SentenceKV server (per-request ``vllm_xargs``), a policy with other units (``quest``) on its own."""
    if policy == "full":
        return "full"
    return "sentencekv" if policies.compatible(policy, "sentencekv") else policy


@dataclass
class Engine:
    """A running server plus the per-request arguments selecting one policy on it; one OpenAI client per engine
    (its connection pool is reused across the run's requests)."""

    server: Any                    # launch.Server or Endpoint: both have .url and .v1
    policy: str
    budget: int | None = None      # sent per request (remote servers, whose config the harness did not write)
    stock_full: bool = True        # FULL runs on a stock server: no xargs at all

    @property
    def model(self) -> str:
        return getattr(self.server, "model", LOCAL_SERVED_NAME)

    @property
    def api_key(self) -> str:
        return getattr(self.server, "api_key", "none")

    @cached_property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.v1, api_key=self.api_key, timeout=1800, max_retries=0)

    def metrics_text(self) -> str:
        return self.server.metrics() if hasattr(self.server, "metrics") else ""

    def xargs(self) -> dict[str, Any] | None:
        if self.policy == "full" and self.stock_full:
            return None
        xargs: dict[str, Any] = {"sentencekv_policy": self.policy}
        if self.budget is not None and self.policy != "full":
            xargs["sentencekv_budget"] = self.budget
        return {"vllm_xargs": xargs}

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 logprobs: int | None = None) -> dict:
        """One completion; with ``logprobs`` also the generated token ids and their logprobs (greedy agreement)."""
        extra = dict(self.xargs() or {})
        if logprobs is not None:
            extra["return_tokens_as_token_ids"] = True
        t0 = time.perf_counter()
        res = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=temperature, seed=seed, logprobs=logprobs,
                                             extra_body=extra or None)
        choice = res.choices[0]
        out = {"text": choice.text, "tokens": res.usage.completion_tokens, "latency_s": time.perf_counter() - t0}
        if logprobs is not None and choice.logprobs is not None:
            out["token_ids"] = [token_id(t) for t in choice.logprobs.tokens]
            out["logprobs"] = [round(lp, 5) if lp is not None else None for lp in choice.logprobs.token_logprobs]
        return out


def token_id(token: str) -> int | str:
    """``token_id:123`` (vLLM's ``return_tokens_as_token_ids``) -> 123; other servers' strings stay strings."""
    return int(token[9:]) if token.startswith("token_id:") and token[9:].isdigit() else token


@contextmanager
def engines_for(spec: EngineSpec, policies: list[str]) -> Iterator[Iterator[Engine]]:
    """Yields an iterator of Engines grouped so that each server starts once (or none, for running servers)."""
    def started() -> Iterator[Engine]:
        groups: dict[str, list[str]] = {}
        for p in policies:
            groups.setdefault(server_group(p), []).append(p)
        for group, members in groups.items():
            with vllm_server(spec.model, *spec.server_args(group)) as srv:
                for policy in members:
                    yield Engine(srv, policy)

    def running() -> Iterator[Engine]:
        for policy in policies:
            yield Engine(spec.endpoint(policy), policy, budget=spec.budget,
                         stock_full=bool(spec.full_base_url))

    yield running() if spec.remote else started()
