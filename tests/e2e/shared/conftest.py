"""The shared SentenceKV server: one ``vllm serve`` (real SmolLM2, float32, 32-token blocks, the inspector plugin)
for every test in this package, started once and stopped after the package's last test. Per-request options
(``vllm_xargs``) select budgets, policies and traces, so none of these tests needs a server of its own.

A stock vLLM server runs first (and is gone before the shared one starts: 2 cores) to record the reference
outputs that full-budget SentenceKV must reproduce token for token.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import openai
import pytest

from tests import prompts
from tests.e2e.servers import MODEL_NAME, SHARED, SHARED_ARGS, SKV, additional_config
from tests.server import vllm_server

MAX_TOKENS = 24


class Shared:
    """The running server, an OpenAI client for it, and the temporary directory it was told to use."""

    def __init__(self, srv, tmp: Path, started: float) -> None:
        self.srv, self.tmp, self.started = srv, tmp, started
        self.url, self.v1 = srv.url, srv.v1
        self.client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=600)

    def metrics(self) -> str:
        return self.srv.metrics()

    def complete(self, prompt, max_tokens: int = MAX_TOKENS, **xargs):
        """Greedy completion; ``xargs`` become ``vllm_xargs`` (``sentencekv_budget=...``)."""
        return self.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              extra_body={"vllm_xargs": xargs} if xargs else None)

    def text(self, prompt, max_tokens: int = MAX_TOKENS, **xargs) -> str:
        return self.complete(prompt, max_tokens, **xargs).choices[0].text


@pytest.fixture(scope="package")
def varied(tokenizer) -> list[str]:
    return prompts.varied_prompts(tokenizer)


@pytest.fixture(scope="package")
def stock_outputs(model_path, varied) -> list[str]:
    with vllm_server(model_path, *SHARED_ARGS) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        return [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
                .choices[0].text for p in varied]


@pytest.fixture(scope="package")
def shared(model_path, stock_outputs):
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="skv-shared-tmp-") as tmp:
        env = {"VLLM_PLUGINS": "sentencekv,sentencekv_inspector", "TMPDIR": tmp}
        with vllm_server(model_path, *SHARED_ARGS, *SKV, *additional_config(SHARED), env=env) as srv:
            yield Shared(srv, Path(tmp), started)


@pytest.fixture(scope="package")
def needle(tokenizer) -> str:
    return prompts.needle_prompt(tokenizer)


@pytest.fixture(scope="package")
def traced_needle(shared, needle):
    """The needle request with a per-request trace (``vllm_xargs.sentencekv_trace``; the server keeps no ring):
    used by the needle, inspector and trace tests. Traced rows take the exact path."""
    res = shared.complete(needle, max_tokens=24, sentencekv_trace=True)
    shared.text("Hello", max_tokens=2)          # a later step lets the worker retire the finished request
    return res
