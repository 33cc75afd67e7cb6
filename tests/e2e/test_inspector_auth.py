"""Issue #17: with ``vllm serve --api-key``, every inspector route answers 401 without the key and 200 with it
(vLLM's own middleware guards only /v1-style paths)."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests import prompts
from tests.server import vllm_server

pytestmark = pytest.mark.slow
KEY = "sk-inspector-test"
ARGS = ("--enforce-eager", "--max-model-len", "4096", "--served-model-name", "smollm2", "--attention-backend",
        "sentencekv", "--api-key", KEY)


@pytest.fixture(scope="module")
def server(model_path, tokenizer):
    cfg = {"sentencekv": {"budget": 256, "trace_requests": 4}}
    env = {"VLLM_PLUGINS": "sentencekv,sentencekv_inspector", "VLLM_API_KEY": ""}
    with vllm_server(model_path, *ARGS, "--additional-config", json.dumps(cfg), env=env) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key=KEY)
        res = client.completions.create(model="smollm2", prompt=prompts.needle_prompt(tokenizer, n_tokens=1500),
                                        max_tokens=12, temperature=0)
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)   # lets the worker retire it
        yield srv, res.id


def routes(request_id: str) -> list[str]:
    return ["/sentencekv/config", "/sentencekv/requests", f"/sentencekv/requests/{request_id}", "/sentencekv/ui"]


def test_vllms_own_routes_are_guarded(server):
    srv, _ = server
    assert requests.get(srv.v1 + "/models", timeout=10).status_code == 401


def test_every_inspector_route_needs_the_key(server):
    srv, request_id = server
    for route in routes(request_id):
        assert requests.get(srv.url + route, timeout=10).status_code == 401, route
        wrong = requests.get(srv.url + route, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert wrong.status_code == 401, route


def test_every_inspector_route_answers_with_the_key(server):
    srv, request_id = server
    auth = {"Authorization": f"Bearer {KEY}"}
    for route in routes(request_id):
        assert requests.get(srv.url + route, headers=auth, timeout=10).status_code == 200, route
    listing = requests.get(srv.url + "/sentencekv/requests", headers=auth, timeout=10).json()
    assert any(r.startswith(request_id) for r in listing["requests"])
    page = requests.get(srv.url + "/sentencekv/ui", timeout=10)
    assert page.status_code == 401 and 'type="password"' in page.text, "the page asks for the key"
