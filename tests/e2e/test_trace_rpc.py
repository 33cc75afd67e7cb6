"""Issue #17: on the real server, a per-request opt-in trace (``vllm_xargs.sentencekv_trace: true``) reaches the
inspector through vLLM's engine RPC, other requests are not traced, and no trace file appears on disk."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import openai
import pytest
import requests

from tests import prompts
from tests.server import vllm_server

pytestmark = pytest.mark.slow
ARGS = ("--enforce-eager", "--max-model-len", "4096", "--served-model-name", "smollm2", "--attention-backend",
        "sentencekv", "--additional-config", json.dumps({"sentencekv": {"budget": 256}}))


def files_mentioning(root: Path, needle: str) -> list[Path]:
    """Files under ``root`` whose name or (first MB of) content mentions ``needle``."""
    found = []
    for path in root.rglob("*"):
        try:
            if not path.is_file():
                continue
            with path.open("rb") as fh:
                if needle in path.name or needle.encode() in fh.read(1 << 20):
                    found.append(path)
        except OSError:
            continue
    return found


def test_opt_in_trace_is_served_from_memory(model_path, tokenizer):
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="skv-tmp-") as tmp:
        env = {"VLLM_PLUGINS": "sentencekv,sentencekv_inspector", "TMPDIR": tmp, "SENTENCEKV_TRACE_DIR": ""}
        with vllm_server(model_path, *ARGS, env=env) as srv:
            client = openai.OpenAI(base_url=srv.v1, api_key="x")
            traced = client.completions.create(
                model="smollm2", prompt=prompts.needle_prompt(tokenizer, n_tokens=1500), max_tokens=12,
                temperature=0, extra_body={"vllm_xargs": {"sentencekv_trace": True}})
            plain = client.completions.create(model="smollm2", prompt=prompts.needle_prompt(tokenizer, n_tokens=1200),
                                              max_tokens=8, temperature=0)
            client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)   # lets the worker retire them
            listing: dict = {}
            deadline = time.time() + 30
            while time.time() < deadline and not listing.get("requests"):
                listing = requests.get(srv.url + "/sentencekv/requests", timeout=10).json()
                time.sleep(0.5)
            assert listing["tracing"] is False, "no server-wide ring"
            assert [r for r in listing["requests"] if r.startswith(traced.id)], listing
            assert not [r for r in listing["requests"] if r.startswith(plain.id)], "only the opted-in request"
            doc = requests.get(srv.url + f"/sentencekv/requests/{traced.id}", params={"top": 5}, timeout=10).json()
            assert doc["budget"] == 256 and doc["prompt_len"] > 1000 and doc["generated"]
            assert any("7291" in s["text"] for s in doc["sentences"]), "sentence text decoded by the API server"
            assert requests.get(srv.url + f"/sentencekv/requests/{plain.id}", timeout=10).status_code == 404
            old_default = [p for p in Path(tempfile.gettempdir()).glob("sentencekv-trace-*")
                           if p.stat().st_mtime >= started]          # where traces went before #17
            written = files_mentioning(Path(tmp), traced.id) + old_default
            assert not written, f"trace files on disk: {written}"
