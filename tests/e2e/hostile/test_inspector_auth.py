"""Issue #17: with an API key on the server, every inspector route (the page included) needs it, like vLLM's own
routes (hostile server: ``--api-key``, every request traced)."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.hostile.conftest import API_KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def request_id(server, client) -> str:
    res = client.completions.create(model="smollm2", prompt="The sea was calm. The boat was small. Where were we?",
                                    max_tokens=8, temperature=0)
    deadline = time.time() + 30
    while time.time() < deadline:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)   # lets the worker retire it
        listing = requests.get(server.url + "/sentencekv/requests", headers=AUTH, timeout=10).json()
        if any(r.startswith(res.id) for r in listing["requests"]):
            return res.id
        time.sleep(0.5)
    raise AssertionError(f"{res.id} never appeared in the trace ring")


def routes(request_id: str) -> list[str]:
    return ["/sentencekv/config", "/sentencekv/requests", f"/sentencekv/requests/{request_id}", "/sentencekv/ui"]


def test_vllms_own_routes_are_guarded(server):
    assert requests.get(server.v1 + "/models", timeout=10).status_code == 401


def test_every_inspector_route_needs_the_key(server, request_id):
    for route in routes(request_id):
        assert requests.get(server.url + route, timeout=10).status_code == 401, route
        wrong = requests.get(server.url + route, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert wrong.status_code == 401, route


def test_every_inspector_route_answers_with_the_key(server, request_id):
    for route in routes(request_id):
        assert requests.get(server.url + route, headers=AUTH, timeout=10).status_code == 200, route
    page = requests.get(server.url + "/sentencekv/ui", timeout=10)
    assert page.status_code == 401 and 'type="password"' in page.text, "the page asks for the key"
    cfg = requests.get(server.url + "/sentencekv/config", headers=AUTH, timeout=10).json()
    assert cfg["segmentation"] == "spacy" and cfg["trace_requests"] == 64 and cfg["trace_dir"]
