"""Issue #9: the retrieval inspector on vLLM's own server, with a real headless Chromium rendering the page."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import openai
import pytest
import requests

from tests import prompts
from tests.server import vllm_server

pytestmark = pytest.mark.slow
PLUGINS = {"VLLM_PLUGINS": "sentencekv,sentencekv_inspector"}
ARGS = ("--enforce-eager", "--max-model-len", "8192", "--served-model-name", "smollm2", "--attention-backend",
        "sentencekv")
RESULTS = Path(__file__).parents[2] / "results"


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is installed by scripts/setup.sh"
    profile = tempfile.mkdtemp(prefix="chromium-")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,900"]
    try:
        return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def traced(model_path, tokenizer):
    cfg = {"sentencekv": {"budget": 512, "trace_requests": 8}}
    with vllm_server(model_path, *ARGS, "--additional-config", json.dumps(cfg), env=PLUGINS) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        res = client.completions.create(model="smollm2", prompt=prompts.needle_prompt(tokenizer), max_tokens=24,
                                        temperature=0)
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)   # lets the worker retire it
        yield srv, res


def test_needle_request_trace(traced):
    srv, res = traced
    assert "7291" in res.choices[0].text
    listing = requests.get(srv.url + "/sentencekv/requests", timeout=10).json()
    assert listing["tracing"] and any(r.startswith(res.id) for r in listing["requests"])
    doc = requests.get(srv.url + f"/sentencekv/requests/{res.id}", params={"top": 10}, timeout=10).json()
    assert doc["budget"] == 512 and doc["policy"] == "sentencekv" and doc["prompt_len"] > 4000
    assert {"id", "start", "end", "text", "tier", "generated"} <= set(doc["sentences"][0])
    needle = [s["id"] for s in doc["sentences"] if "7291" in s["text"] and not s["generated"]]
    assert needle, "the needle sentence is in the index"
    assert doc["generated"], "generated sentences were traced"
    for record in doc["generated"]:
        assert {"start", "end", "text", "steps", "budget", "retrieved"} <= set(record)
        assert len(record["retrieved"]) <= 10
        assert all({"sentence", "attention", "hits", "share", "mean_score"} <= set(r) for r in record["retrieved"])
    answer = next(r for r in doc["generated"] if "7291" in r["text"] or r is doc["generated"][-1])
    top = [r["sentence"] for r in answer["retrieved"]]
    assert set(needle) & set(top), f"needle {needle} not among the 10 sentences drawing most attention {top}"


def test_config_and_errors(traced):
    srv, _ = traced
    cfg = requests.get(srv.url + "/sentencekv/config", timeout=10).json()
    assert cfg["budget"] == 512 and cfg["trace_requests"] == 8
    assert requests.get(srv.url + "/sentencekv/requests/cmpl-does-not-exist", timeout=10).status_code == 404
    assert requests.get(srv.url + "/sentencekv/requests/bad$id", timeout=10).status_code == 400
    assert requests.get(srv.url + "/sentencekv/requests/cmpl-x", params={"top": 0}, timeout=10).status_code == 400
    assert requests.get(srv.url + "/sentencekv/requests/cmpl-x", params={"top": "many"},
                        timeout=10).status_code in (400, 422)


def test_page_renders_in_chromium(traced):
    srv, res = traced
    url = srv.url + f"/sentencekv/ui?request={res.id}"
    dom = chromium("--dump-dom", url)
    assert 'data-loaded="1"' in dom.stdout, dom.stderr[-2000:]
    assert 'class="s ' in dom.stdout and " hit" in dom.stdout and "7291" in dom.stdout
    RESULTS.mkdir(exist_ok=True)
    shot = RESULTS / "inspector.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_trace_off_keeps_nothing(model_path):
    with vllm_server(model_path, *ARGS, "--additional-config", '{"sentencekv": {"budget": 512}}',
                     env={**PLUGINS, "SENTENCEKV_TRACE_DIR": ""}) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        res = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)
        listing = requests.get(srv.url + "/sentencekv/requests", timeout=10).json()
        assert listing == {"tracing": False, "requests": []}
        assert requests.get(srv.url + f"/sentencekv/requests/{res.id}", timeout=10).status_code == 404
