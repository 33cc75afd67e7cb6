"""Issue #17: retrieval traces stay in the worker's memory and reach the inspector through vLLM's RPC (no files);
per-request opt-in; bounded rings and traces; prompts with more than 4096 sentences still render (no server)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
import time
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration import trace
from sentencekv_vllm.integration.trace import MAX_UNITS, RING, RequestTrace, TraceRPC


class Decoder:
    """Token id i decodes to ``<i>``; enough to check which spans were kept."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


class FakeEngine:
    """The part of vLLM's ``AsyncLLM`` the inspector uses; the RPC lands on a real :class:`TraceRPC`."""

    def __init__(self) -> None:
        self.worker = TraceRPC()
        self.calls: list[dict] = []

    async def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):
        self.calls.append({"method": method, **(kwargs or {})})
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def get_tokenizer(self) -> Decoder:
        return Decoder()


def fake_request(n_units: int, prompt_len: int, sentence_len: int = 4, gen: int = 8, budget: int = 128,
                 retrieved: tuple[int, ...] = (3,)) -> tuple[SimpleNamespace, list[int]]:
    """A request state as the worker holds it after decoding: units over the prompt and ``gen`` generated tokens;
    one closed generated sentence whose steps drew mostly from ``retrieved``."""
    units = [(i * sentence_len, (i + 1) * sentence_len) for i in range(n_units)]
    tokens = list(range(prompt_len + gen))
    rt = RequestTrace()
    for _ in range(3):
        hits = torch.zeros(n_units)
        mass = torch.full((n_units,), 0.001)
        for rank, u in enumerate(retrieved):
            hits[u], mass[u] = 4, 1.0 / (rank + 1)
        rt.add(hits, hits * 0.5, mass)
    rt.close(prompt_len, prompt_len + gen // 2, budget, pairs_per_step=8)
    req = SimpleNamespace(trace=rt, open_start=prompt_len + gen // 2, units=units, host_map={0: 5},
                          prompt_len=prompt_len, cfg=SimpleNamespace(policy="sentencekv", budget=budget),
                          trace_pairs=8)
    return req, tokens


@pytest.fixture(autouse=True)
def empty_ring(monkeypatch):
    monkeypatch.delenv(trace.TRACE_DIR_ENV, raising=False)
    RING.clear()
    yield
    RING.clear()


def test_who_is_traced():
    off, ring, no_opt_in = SentenceKVConfig(), SentenceKVConfig(trace_requests=4), SentenceKVConfig(
        trace_per_request=False)
    assert not trace.wanted(off, None) and trace.wanted(off, {"sentencekv_trace": True})
    assert trace.wanted(off, {"sentencekv_trace": 1}), "vLLM's vllm_xargs schema turns JSON true into 1"
    assert not trace.wanted(off, {"sentencekv_trace": 2})
    assert trace.wanted(ring, {}) and not trace.wanted(ring, {"sentencekv_trace": False})
    assert not trace.wanted(no_opt_in, {"sentencekv_trace": True})
    assert (trace.ring_size(off), trace.ring_size(ring), trace.ring_size(no_opt_in)) == (trace.OPT_IN_RING, 4, 0)


def test_finished_trace_is_kept_in_memory_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        req, tokens = fake_request(20, prompt_len=80)
        trace.finish("cmpl-abc-0", req, tokens, SentenceKVConfig(), block_size=16, tokenizer=Decoder)
    finally:
        tempfile.tempdir = None
    assert list(tmp_path.iterdir()) == [], "a trace reached the disk"
    assert RING.ids() == ["cmpl-abc-0"]
    wire = TraceRPC().sentencekv_traces("cmpl-abc")            # prefix of vLLM's id, as the OpenAI id is
    doc = trace.document(wire, Decoder().decode)
    assert doc["prompt_len"] == 80 and doc["omitted_sentences"] == 0 and len(doc["sentences"]) == 20
    assert doc["sentences"][3]["text"] == "<12><13><14><15>" and doc["sentences"][0]["tier"] == "host"
    assert doc["sentences"][4]["tier"] == "device"
    assert [g["text"] for g in doc["generated"]] == ["<80><81><82><83>"]      # the open one had no steps
    assert doc["generated"][0]["retrieved"][0]["sentence"] == 3
    assert TraceRPC().sentencekv_traces("cmpl-unknown") is None


def test_ring_keeps_the_newest(monkeypatch):
    cfg = SentenceKVConfig(trace_requests=3)
    for i in range(5):
        req, tokens = fake_request(6, prompt_len=24)
        trace.finish(f"cmpl-{i}", req, tokens, cfg, block_size=16, tokenizer=Decoder)
    assert RING.ids() == ["cmpl-4", "cmpl-3", "cmpl-2"]


def test_operator_directory_gets_json_files(tmp_path):
    cfg = SentenceKVConfig(trace_requests=2, trace_dir=str(tmp_path / "traces"))
    for i in range(3):
        req, tokens = fake_request(6, prompt_len=24)
        trace.finish(f"cmpl-{i}", req, tokens, cfg, block_size=16, tokenizer=Decoder)
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["cmpl-1.json", "cmpl-2.json"]


def test_more_than_4096_sentences_keep_what_was_retrieved():
    n = MAX_UNITS + 1500
    deep = (n - 10, 5000, 17)
    req, tokens = fake_request(n, prompt_len=4 * n, retrieved=deep)
    item = trace.snapshot("cmpl-long", req, tokens, block_size=16)
    ids = [s[0] for s in item.sentences]
    assert len(ids) == MAX_UNITS and ids == sorted(ids) and set(deep) <= set(ids)
    assert {u + 1 for u in deep} <= set(ids), "neighbours of retrieved sentences are kept for context"
    assert sum(len(p[1]) for p in item.pieces) <= trace.MAX_TOKENS
    doc = trace.document(item.to_wire(), Decoder().decode)
    assert doc["total_sentences"] == n and doc["omitted_sentences"] == n - MAX_UNITS
    kept = {s["id"] for s in doc["sentences"]}
    assert all(r["sentence"] in kept for g in doc["generated"] for r in g["retrieved"])
    far = next(s for s in doc["sentences"] if s["id"] == n - 10)
    assert far["text"] == "".join(f"<{i}>" for i in range(4 * (n - 10), 4 * (n - 9)))


def test_one_trace_is_bounded_in_tokens():
    req, tokens = fake_request(2000, prompt_len=2000 * 64, sentence_len=64)
    item = trace.snapshot("cmpl-big", req, tokens, block_size=16)
    assert sum(len(p[1]) for p in item.pieces) <= trace.MAX_TOKENS + 64     # + the generated record
    assert len(item.sentences) == trace.MAX_TOKENS // 64


def inspector(config: dict, engine=None, api_key=None) -> TestClient:
    from sentencekv_vllm.inspector.plugin import InspectorPlugin

    plugin = InspectorPlugin()
    app = FastAPI()
    app.state.args = Namespace(api_key=api_key)
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(engine, None, Namespace(api_key=api_key, attention_backend="sentencekv",
                                                          additional_config={"sentencekv": config})))
    return TestClient(app)


def test_inspector_reads_traces_through_the_engine_rpc():
    engine = FakeEngine()
    req, tokens = fake_request(20, prompt_len=80)
    trace.finish("cmpl-opt-in-0", req, tokens, SentenceKVConfig(), block_size=16, tokenizer=Decoder)
    c = inspector({"budget": 128}, engine)                        # no ring: a per-request opt-in trace
    assert c.get("/sentencekv/requests").json() == {"tracing": False, "requests": ["cmpl-opt-in-0"]}
    doc = c.get("/sentencekv/requests/cmpl-opt-in", params={"top": 1}).json()
    assert doc["request_id"] == "cmpl-opt-in-0" and len(doc["generated"][0]["retrieved"]) == 1
    assert doc["sentences"][3]["text"] == "<12><13><14><15>"
    assert c.get("/sentencekv/requests/cmpl-nope").status_code == 404
    assert {call["method"] for call in engine.calls} == {trace.RPC_METHOD}


def test_inspector_without_any_tracing_does_not_call_the_engine():
    engine = FakeEngine()
    c = inspector({"budget": 128, "trace_per_request": False}, engine)
    assert c.get("/sentencekv/requests").json() == {"tracing": False, "requests": []}
    assert c.get("/sentencekv/requests/cmpl-x").status_code == 404
    assert engine.calls == []


def test_inspector_survives_an_engine_without_the_rpc():
    class Stock(FakeEngine):
        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            raise NotImplementedError(f"Method {method!r} is not implemented.")

    c = inspector({"budget": 128, "trace_requests": 4}, Stock())
    assert c.get("/sentencekv/requests").json() == {"tracing": True, "requests": []}
    assert c.get("/sentencekv/requests/cmpl-x").status_code == 404


@pytest.mark.slow
def test_page_renders_a_prompt_of_more_than_4096_sentences(tmp_path):
    """The page with a long trace: gaps instead of the sentences left out, and it still loads (before: a TypeError
    on a retrieved sentence that was not in the list)."""
    import uvicorn

    from sentencekv_vllm.inspector.plugin import InspectorPlugin

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is installed by scripts/setup.sh")
    n = MAX_UNITS + 900
    req, tokens = fake_request(n, prompt_len=4 * n, retrieved=(n - 3, 2048))
    trace.finish("cmpl-long-0", req, tokens, SentenceKVConfig(), block_size=16, tokenizer=Decoder)
    plugin = InspectorPlugin()
    app = FastAPI()
    app.state.args = Namespace(api_key=None)
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(FakeEngine(), None, Namespace(api_key=None, attention_backend="sentencekv",
                                                                additional_config={})))
    from tests.server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path}",
                 "--virtual-time-budget=15000", "--dump-dom"]
        dom = subprocess.run([chromium, *flags, f"http://127.0.0.1:{port}/sentencekv/ui?request=cmpl-long"],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        server.should_exit = True
        thread.join(10)
    assert 'data-loaded="1"' in dom
    assert "not kept in the trace" in dom and f"of {n} sentences shown" in dom
    assert f'data-sentence="{n - 3}"' in dom and " hit" in dom
