"""Extension point: ``vllm.endpoint_plugins`` -- adds ``/sentencekv/*`` routes to vLLM's OpenAI server.

Enable with ``VLLM_PLUGINS=sentencekv,sentencekv_inspector`` (vLLM loads endpoint plugins only when allowlisted; the
list must keep the general plugin ``sentencekv``); ``"trace_requests": N`` in the SentenceKV config traces every
request, ``vllm_xargs.sentencekv_trace: true`` traces one request (``trace_per_request``, on by default). Routes:

* ``GET /sentencekv/config`` -- the effective SentenceKV configuration;
* ``GET /sentencekv/requests`` -- ids of the traced requests still in the ring, newest first;
* ``GET /sentencekv/requests/{request_id}?top=K`` -- sentences (spans, text, tier) and, per generated sentence, the
  K retrieved sentences that drew the most attention (``attention``: share of the attention mass on selected
  middle tokens; ``hits``/``share``: how many layer x KV-head selections; ``mean_score``: selection score); the
  OpenAI response id (``cmpl-...``) is enough (prefix match);
* ``GET /sentencekv/ui`` -- the web page.

With an API key on the server (``--api-key`` or ``VLLM_API_KEY``) every route, the page included, requires
``Authorization: Bearer <key>`` (:mod:`~sentencekv_vllm.inspector.auth`): 401 otherwise. Opened in a browser
without the header, ``/sentencekv/ui`` answers 401 with a small form that asks for the key, loads the page with it
and keeps it in the tab's ``sessionStorage`` for the page's own requests.

Traces live in the worker's memory (:mod:`sentencekv_vllm.integration.trace`); the routes fetch them with vLLM's
own frontend -> engine RPC (``engine_client.collective_rpc``), which EngineCore runs between steps, and decode the
token ids here with the server's tokenizer in a thread. Handlers are ``async`` and never block the event loop: no
file reads (the page is read once at start-up), the RPC is awaited with a timeout (503 if the engine does not
answer), decoding runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import re
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.inspector.auth import KeyCheck
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.trace import RPC_METHOD, document

_ID = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
UI_PATH = Path(__file__).with_name("ui.html")
RPC_TIMEOUT_S = 30.0


class InspectorPlugin:
    name = "sentencekv_inspector"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.auth = KeyCheck([])
        self.engine: Any = None          # vLLM's engine client (AsyncLLM) once init_state ran
        self.page = UI_PATH.read_text()
        self._rpc_failed = False

    def attach_router(self, app: FastAPI) -> None:
        # vLLM sets app.state.args before plugins attach and adds its key middleware after; same args, same keys
        self.auth = KeyCheck.from_args(getattr(app.state, "args", None))
        app.include_router(build_router(self))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.auth = KeyCheck.from_args(args)
        self.engine = engine_client
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        self.config = SentenceKVConfig.from_additional_config(extra).to_dict()
        self.config["attention_backend"] = getattr(args, "attention_backend", None)

    @property
    def tracing(self) -> bool:
        """Server-wide tracing (``trace_requests > 0``)."""
        return self.config.get("trace_requests", 0) > 0

    @property
    def any_tracing(self) -> bool:
        """Some request may have a trace: server-wide or per-request opt-in."""
        return self.tracing or bool(self.config.get("trace_per_request", False))

    async def fetch(self, request_id: str | None = None) -> dict[str, Any] | None:
        """Rank 0's answer to the trace RPC (workers of one engine trace the same requests); ``None`` without an
        engine, or if the engine has no SentenceKV worker (logged once)."""
        if self.engine is None:
            return None
        call = self.engine.collective_rpc(RPC_METHOD, kwargs={"request_id": request_id})
        try:
            results = await asyncio.wait_for(call, RPC_TIMEOUT_S)
        except asyncio.TimeoutError as err:
            raise HTTPException(503, f"the engine did not answer within {RPC_TIMEOUT_S:.0f} s") from err
        except Exception as err:  # noqa: BLE001 - e.g. the engine runs another backend's worker
            if not self._rpc_failed:
                get_logger(__name__).warning("SentenceKV inspector: trace RPC failed (%s: %s); is the engine "
                                             "running --attention-backend sentencekv?", type(err).__name__, err)
                self._rpc_failed = True
            return None
        return results[0] if results else None

    def decode(self, ids: list[int]) -> str:
        return self.engine.get_tokenizer().decode(ids)


def build_router(plugin: InspectorPlugin) -> APIRouter:
    def require_key(request: Request) -> None:
        if not plugin.auth.allows(request.headers):
            raise HTTPException(401, "Unauthorized", headers={"WWW-Authenticate": "Bearer"})

    page = APIRouter(prefix="/sentencekv", tags=["sentencekv"])      # checks the key itself (HTML answer)
    router = APIRouter(dependencies=[Depends(require_key)])            # JSON routes: 401 without the key

    @router.get("/config")
    async def config() -> dict[str, Any]:
        return plugin.config

    @router.get("/requests")
    async def requests() -> dict[str, Any]:
        listing = await plugin.fetch() if plugin.any_tracing else None
        return {"tracing": plugin.tracing, "requests": (listing or {}).get("requests", [])}

    @router.get("/requests/{request_id}")
    async def request(request_id: str, top: int = Query(5, description="retrieved sentences per generated one")):
        if not _ID.match(request_id):
            raise HTTPException(400, "request_id may contain only letters, digits, '.', '_' and '-'")
        if not 1 <= top <= 64:
            raise HTTPException(400, "top must be between 1 and 64")
        if not plugin.any_tracing:
            raise HTTPException(404, "tracing is off (set sentencekv.trace_requests > 0 or allow "
                                     "sentencekv.trace_per_request)")
        wire = await plugin.fetch(request_id)
        if wire is None:
            raise HTTPException(404, f"no trace for request {request_id!r} (unknown, not traced, not finished, or "
                                     "expired from the ring)")
        return await asyncio.to_thread(document, wire, plugin.decode, top)

    @page.get("/ui", response_class=HTMLResponse)
    async def ui(request: Request) -> HTMLResponse:
        if not plugin.auth.allows(request.headers):
            return HTMLResponse(KEY_FORM, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return HTMLResponse(plugin.page)

    page.include_router(router)
    return page


KEY_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SentenceKV inspector: API key</title>
<style>body{font:14px system-ui,sans-serif;margin:40px}input,button{font:inherit;padding:4px 8px}</style></head>
<body><h3>SentenceKV retrieval inspector</h3>
<p>This server requires its API key (<code>--api-key</code> / <code>VLLM_API_KEY</code>).</p>
<form id="f"><input id="k" type="password" size="40" placeholder="API key" autofocus> <button>Open</button></form>
<p id="err" style="color:#b91c1c"></p>
<script>
document.getElementById("f").onsubmit = async (e) => {
  e.preventDefault();
  const key = document.getElementById("k").value;
  const res = await fetch(location.href, {headers: {Authorization: `Bearer ${key}`}});
  if (!res.ok) { document.getElementById("err").textContent = `${res.status}: wrong key`; return; }
  sessionStorage.setItem("sentencekv_api_key", key);
  const html = await res.text();
  document.open(); document.write(html); document.close();
};
</script></body></html>
"""


def factory() -> InspectorPlugin:
    return InspectorPlugin()
