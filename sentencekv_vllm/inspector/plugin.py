"""Extension point: ``vllm.endpoint_plugins`` -- adds ``/sentencekv/*`` routes to vLLM's OpenAI server.

Enable with ``VLLM_PLUGINS=sentencekv,sentencekv_inspector`` (vLLM loads endpoint plugins only when allowlisted; the
list must keep the general plugin ``sentencekv``) and ``"trace_requests": N`` in the SentenceKV config. Routes:

* ``GET /sentencekv/config`` -- the effective SentenceKV configuration;
* ``GET /sentencekv/requests`` -- ids of the traced requests still in the ring, newest first;
* ``GET /sentencekv/requests/{request_id}?top=K`` -- sentences (spans, text, tier) and, per generated sentence, the
  K retrieved sentences that drew the most attention (``attention``: share of the attention mass on selected
  middle tokens; ``hits``/``share``: how many layer x KV-head selections; ``mean_score``: selection score); the
  OpenAI response id (``cmpl-...``) is enough (prefix match);
* ``GET /sentencekv/ui`` -- the web page.
"""

from __future__ import annotations

import json
import re
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration.trace import TRACE_DIR_ENV, trace_dir

_ID = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
UI_PATH = Path(__file__).with_name("ui.html")


class InspectorPlugin:
    name = "sentencekv_inspector"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router(self))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        self.config = SentenceKVConfig.from_additional_config(extra).to_dict()
        self.config["attention_backend"] = getattr(args, "attention_backend", None)


def _traces() -> list[Path]:
    import os

    if not os.environ.get(TRACE_DIR_ENV):
        return []
    return sorted(trace_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def build_router(plugin: InspectorPlugin) -> APIRouter:
    router = APIRouter(prefix="/sentencekv", tags=["sentencekv"])

    @router.get("/config")
    async def config() -> dict[str, Any]:
        return plugin.config

    @router.get("/requests")
    async def requests() -> dict[str, Any]:
        return {"tracing": plugin.config.get("trace_requests", 0) > 0,
                "requests": [p.stem for p in _traces()]}

    @router.get("/requests/{request_id}")
    async def request(request_id: str, top: int = Query(5, description="retrieved sentences per generated one")):
        if not _ID.match(request_id):
            raise HTTPException(400, "request_id may contain only letters, digits, '.', '_' and '-'")
        if not 1 <= top <= 64:
            raise HTTPException(400, "top must be between 1 and 64")
        if plugin.config.get("trace_requests", 0) <= 0:
            raise HTTPException(404, "tracing is off (set sentencekv.trace_requests > 0)")
        matches = [p for p in _traces() if p.stem == request_id or p.stem.startswith(request_id)]
        if not matches:
            raise HTTPException(404, f"no trace for request {request_id!r} (unknown, not finished, or expired "
                                     "from the ring)")
        doc = json.loads(matches[0].read_text())
        for record in doc["generated"]:
            record["retrieved"] = record["retrieved"][:top]
        return doc

    @router.get("/ui", response_class=HTMLResponse)
    async def ui() -> str:
        return UI_PATH.read_text()

    return router


def factory() -> InspectorPlugin:
    return InspectorPlugin()
