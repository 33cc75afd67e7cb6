"""Issue #17: the inspector's routes require the server's API key, compared the way vLLM compares it (no server)."""

from __future__ import annotations

from argparse import Namespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sentencekv_vllm.inspector.auth import KeyCheck, bearer_matches, server_keys
from sentencekv_vllm.inspector.plugin import InspectorPlugin

ROUTES = ["/sentencekv/config", "/sentencekv/requests", "/sentencekv/requests/cmpl-x", "/sentencekv/ui"]


def client(api_key: list[str] | None) -> TestClient:
    app = FastAPI()
    app.state.args = Namespace(api_key=api_key)
    plugin = InspectorPlugin()
    plugin.config = {"trace_requests": 4}
    plugin.attach_router(app)
    return TestClient(app)


def test_keys_follow_vllms_rule(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert server_keys(Namespace(api_key=["a", "b"])) == ["a", "b"]      # the CLI wins
    assert server_keys(Namespace(api_key=None)) == ["from-env"]
    assert server_keys(None) == ["from-env"]
    monkeypatch.delenv("VLLM_API_KEY")
    assert server_keys(Namespace(api_key=None)) == []
    assert server_keys(Namespace(api_key="single")) == ["single"]


@pytest.mark.parametrize("header", [None, "Bearer k", "bearer k", "Bearer wrong", "Basic k", "Bearer", "Bearer  k",
                                    "Bearer k2"])
def test_same_comparison_as_vllm(header):
    import hashlib

    from starlette.datastructures import Headers
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    headers = Headers(headers={} if header is None else {"Authorization": header})
    expected = AuthenticationMiddleware(app=None, tokens=["k", "k2"]).verify_token(headers)
    assert KeyCheck(["k", "k2"]).allows(headers) == expected
    digests = [hashlib.sha256(t.encode()).digest() for t in ("k", "k2")]
    assert bearer_matches(digests, headers) == expected


def test_every_route_needs_the_key_when_the_server_has_one():
    c = client(["secret"])
    for route in ROUTES:
        assert c.get(route).status_code == 401, route
        assert c.get(route, headers={"Authorization": "Bearer nope"}).status_code == 401, route
        assert c.get(route, headers={"Authorization": "Bearer secret"}).status_code in (200, 404), route
    page = c.get("/sentencekv/ui")
    assert 'type="password"' in page.text and "sessionStorage" in page.text, "the 401 page asks for the key"
    assert c.get("/sentencekv/ui", headers={"Authorization": "Bearer secret"}).text.startswith("<!doctype html>")


def test_no_key_on_the_server_keeps_routes_open(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    c = client(None)
    assert c.get("/sentencekv/config").status_code == 200
    assert c.get("/sentencekv/ui").status_code == 200
