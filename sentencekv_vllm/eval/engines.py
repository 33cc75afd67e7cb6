"""The engines an evaluation talks to: one real ``vllm serve`` per backend, started on demand (or given URLs).

FULL is the stock backend (not SentenceKV with policy ``full``), so every comparison is against unmodified vLLM.
``sentencekv`` and ``streaming`` share one SentenceKV server (per-request ``vllm_xargs`` policy); ``quest`` needs
its own server because its index units are pages. Servers run one at a time (2-core machines).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import openai

from sentencekv_vllm.eval.launch import Server, vllm_server

POLICIES = ("full", "sentencekv", "streaming", "quest")


@dataclass
class EngineSpec:
    model: str
    budget: int = 512
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    extra_args: list[str] = field(default_factory=list)
    skv_config: dict[str, Any] = field(default_factory=dict)

    def server_args(self, policy: str) -> list[str]:
        args = ["--dtype", self.dtype, "--enforce-eager", "--max-model-len", str(self.max_model_len),
                "--served-model-name", "model", *self.extra_args]
        if policy != "full":
            cfg = {"budget": self.budget, "policy": "quest" if policy == "quest" else "sentencekv",
                   **self.skv_config}
            args += ["--attention-backend", "sentencekv", "--additional-config", json.dumps({"sentencekv": cfg})]
        return args


def server_group(policy: str) -> str:
    return {"full": "full", "quest": "quest"}.get(policy, "sentencekv")


@dataclass
class Engine:
    """A running server plus the per-request arguments selecting one policy on it."""

    server: Server
    policy: str

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.v1, api_key="none", timeout=1800, max_retries=0)

    def xargs(self) -> dict[str, Any] | None:
        return {"vllm_xargs": {"sentencekv_policy": self.policy}} if self.policy == "streaming" else None

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> dict:
        t0 = time.perf_counter()
        res = self.client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens,
                                             temperature=temperature, seed=seed, extra_body=self.xargs())
        choice = res.choices[0]
        return {"text": choice.text, "tokens": res.usage.completion_tokens, "latency_s": time.perf_counter() - t0}


@contextmanager
def engines_for(spec: EngineSpec, policies: list[str]) -> Iterator[Iterator[Engine]]:
    """Yields an iterator of Engines grouped so that each server starts once."""
    def gen() -> Iterator[Engine]:
        groups: dict[str, list[str]] = {}
        for p in policies:
            groups.setdefault(server_group(p), []).append(p)
        for group, members in groups.items():
            with vllm_server(spec.model, *spec.server_args(group), metrics=True) as srv:
                for policy in members:
                    yield Engine(srv, policy)
    yield gen()
