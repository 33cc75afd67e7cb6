"""The hostile server: one ``vllm serve`` (real SmolLM2, float32) for the tests of this package, in the
configuration where engine-killing bugs lived: spaCy segmentation (a pipeline loaded from disk), the host tier
with a tiny host pool (~35 blocks, so it also fills up), a device pool of 44 x 32-token blocks, two running
requests at most, priority scheduling, every request traced into a ring that is also written to ``trace_dir``,
and the inspector behind an API key. ``SENTENCEKV_CHECK_SLOTS=1`` makes EngineCore check the host-slot invariant
on every step; violations are counted in ``sentencekv_slot_invariant_violations_total``, which must stay 0."""

from __future__ import annotations

import tempfile
from pathlib import Path

import openai
import pytest

from tests.e2e.servers import F32, HOSTILE, SKV, additional_config
from tests.server import vllm_server

MAX_MODEL_LEN = 1280
API_KEY = "sk-hostile-test"
ARGS = (*F32, "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "32", "--num-gpu-blocks-override", "44",
        "--max-num-seqs", "2", "--max-num-batched-tokens", "512", "--scheduling-policy", "priority",
        "--api-key", API_KEY, *SKV)


@pytest.fixture(scope="package")
def trace_dir():
    with tempfile.TemporaryDirectory(prefix="skv-trace-") as path:
        yield Path(path)


@pytest.fixture(scope="package")
def spacy_pipeline():
    """A spaCy pipeline saved to disk (``spacy_model`` takes a path as well as an installed package name)."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    with tempfile.TemporaryDirectory(prefix="skv-spacy-") as path:
        nlp.to_disk(path)
        yield path


@pytest.fixture(scope="package")
def server(model_path, trace_dir, spacy_pipeline):
    env = {"SENTENCEKV_CHECK_SLOTS": "1", "VLLM_PLUGINS": "sentencekv,sentencekv_inspector", "VLLM_API_KEY": ""}
    cfg = {**HOSTILE, "trace_dir": str(trace_dir), "spacy_model": spacy_pipeline}
    with vllm_server(model_path, *ARGS, *additional_config(cfg), env=env) as srv:
        yield srv


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=600)
