"""`sentencekv-eval` against a running server, end to end in seconds: a stand-in OpenAI-compatible server (stdlib
http.server) answers completions (plain, streamed, with logprobs) and /metrics, so the remote path (--base-url,
--api-key, served --model, per-request vllm_xargs, samples.jsonl, percentiles, report) is checked without vLLM."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sentencekv_vllm.eval import cli

METRICS = """# HELP vllm:cache_config_info info
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1.0
# HELP sentencekv_budget_tokens Server token budget
# TYPE sentencekv_budget_tokens gauge
sentencekv_budget_tokens 2048.0
"""


class Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, METRICS.encode(), "text/plain")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append({"auth": self.headers.get("Authorization"), **body})
        policy = (body.get("vllm_xargs") or {}).get("sentencekv_policy", "stock")
        ids = [1, 2, 3, 4] if policy in ("stock", "full") else [1, 2, 9, 4]
        n = min(body.get("max_tokens") or 4, len(ids))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(n):
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        logprobs = {"tokens": [f"token_id:{t}" for t in ids[:n]], "token_logprobs": [-0.5] * n,
                    "top_logprobs": None, "text_offset": list(range(n))} if body.get("logprobs") is not None else None
        res = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "text": " ".join(map(str, ids[:n])), "finish_reason": "length",
                            "logprobs": logprobs}],
               "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}
        self._send(200, json.dumps(res).encode(), "application/json")

    def _send(self, code: int, data: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_eval_all_against_a_running_server(fake_server: str, tmp_path: Path, model_path: str):
    out = tmp_path / "remote"
    rc = cli.main(["all", "--base-url", fake_server, "--api-key", "secret", "--model", "served-name", "--tokenizer",
                   model_path, "--policies", "full,sentencekv,streaming", "--out", str(out), "--quick", "--limit", "1",
                   "--contexts", "300", "--depths", "0.5", "--task-contexts", "300", "--bench-contexts", "300",
                   "--poisson-rate", "50", "--ppl-tokens", "100", "--length-tokens", "4", "--budget", "512"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert "memory" not in results["parts"]
    assert {r["model"] for r in Handler.seen} == {"served-name"} and {r["auth"] for r in Handler.seen} == \
        {"Bearer secret"}
    policies = {(r.get("vllm_xargs") or {}).get("sentencekv_policy") for r in Handler.seen}
    assert policies == {"full", "sentencekv", "streaming"}
    assert all(r["vllm_xargs"].get("sentencekv_budget") == 512 for r in Handler.seen
               if r["vllm_xargs"]["sentencekv_policy"] != "full")
    fid = results["parts"]["niah"]["summary"]["sentencekv"]["fidelity"]["niah"]
    assert fid["prefix_tokens"] == 2 and fid["n"] == 1
    point = results["parts"]["serve-bench"]["per_policy"]["sentencekv"]["grid"][0]
    assert point["itl_s_p50"] >= 0 and point["ttft_s_p99"] >= point["ttft_s_p50"]
    poisson = results["parts"]["serve-bench"]["per_policy"]["sentencekv"]["poisson"]    # from `vllm bench serve`
    assert poisson["vllm_bench"]["completed"] == len(poisson["latencies"]) >= 2 and poisson["failed"] == 0
    assert poisson["ttft_s_p99"] >= poisson["ttft_s_p50"] > 0
    assert results["config"]["servers"]["sentencekv"] == {"url": fake_server, "block_size": 16,
                                                          "num_gpu_blocks": 1000, "budget": 2048}
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert {json.loads(line)["part"] for line in lines} == {"niah", "synthetic", "qa", "lengths", "lengths_t07"}
    report = (out / "report.md").read_text()
    assert "`served-name`" in report and "block size 16" in report and "ITL p99" in report
    assert "top-1 match share" in report and "Q4_1" not in report
    assert "τ = 512 tokens" in report           # sent per request, overriding the server's 2048
