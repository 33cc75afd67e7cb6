"""Issue #8 (part): invalid configuration fails at start-up naming the key; bad requests get 4xx and the server
stays healthy. Real `vllm serve`, real model, real OpenAI client."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.server import run_serve_expecting_failure, vllm_server

pytestmark = pytest.mark.slow

BAD_CONFIGS = [
    ({"budget": 0}, "sentencekv.budget"),
    ({"budget": 48, "sinks": 32, "recent": 32}, "sentencekv.budget"),
    ({"bugdet": 512}, "sentencekv.bugdet"),
    ({"budget": "lots"}, "sentencekv.budget"),
    ({"policy": "h2o"}, "sentencekv.policy"),
]


@pytest.mark.parametrize("section,key", BAD_CONFIGS, ids=[k + ":" + json.dumps(s) for s, k in BAD_CONFIGS])
def test_invalid_additional_config_fails_at_startup(model_path, section, key):
    code, out = run_serve_expecting_failure(model_path, "--attention-backend", "sentencekv", "--enforce-eager",
                                            "--additional-config", json.dumps({"sentencekv": section}))
    assert code != 0
    assert key in out, out[-3000:]
    assert "EngineCore" not in out, "must fail before any engine process starts"


def test_speculative_decoding_is_refused(model_path):
    code, out = run_serve_expecting_failure(
        model_path, "--attention-backend", "sentencekv", "--enforce-eager",
        "--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                            "prompt_lookup_max": 3}))
    assert code != 0
    assert "speculative decoding" in out, out[-3000:]


@pytest.fixture(scope="module")
def server(model_path):
    with vllm_server(model_path, "--attention-backend", "sentencekv", "--enforce-eager", "--max-model-len", "2048",
                     "--served-model-name", "smollm2",
                     "--additional-config", '{"sentencekv": {"budget": 256}}') as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)


def _healthy(server) -> bool:
    return requests.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("xargs,fragment", [
    ({"sentencekv_budget": 10}, "sentencekv.budget"),
    ({"sentencekv_budget": 10**12}, "sentencekv.budget"),
    ({"sentencekv_budget": "many"}, "sentencekv.budget"),
    ({"sentencekv_policy": "h2o"}, "sentencekv.policy"),
    ({"sentencekv_policy": "quest"}, "sentencekv.policy"),
    ({"sentencekv_sinks": 4}, "sentencekv.sinks"),
])
def test_bad_per_request_override_is_400(server, client, xargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, extra_body={"vllm_xargs": xargs})
    assert fragment in str(err.value)
    assert _healthy(server)


def test_empty_and_too_long_prompts_are_400(server, client, tokenizer):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="", max_tokens=4)
    long = "word " * 3000
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt=long, max_tokens=4)
    assert _healthy(server)
    ok = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                   temperature=0)
    assert ok.choices[0].text
