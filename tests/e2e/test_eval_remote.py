"""Issue #18: `sentencekv-eval` against a server it did not start (`--base-url`, `--api-key`, served `--model`), as a
user would point it at their GPU deployment: policies go per request through vllm_xargs, memory is skipped, the
header reports the τ and block size the server says it uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import vllm_server

pytestmark = pytest.mark.slow

SMALL = ["--quick", "--limit", "1", "--contexts", "600", "--depths", "0.5", "--task-contexts", "600",
         "--bench-contexts", "600", "--batches", "2", "--poisson-requests", "2", "--poisson-rate", "4",
         "--bench-tokens", "8", "--answer-tokens", "12", "--length-tokens", "12", "--ppl-tokens", "300"]


def test_eval_against_a_running_server(tmp_path: Path, model_path: str):
    skv = ["--attention-backend", "sentencekv", "--additional-config", '{"sentencekv": {"budget": 192}}']
    with vllm_server(model_path, "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
                     "--served-model-name", "served-skv", "--block-size", "32", "--api-key", "secret", *skv,
                     metrics=True) as srv:
        out = tmp_path / "remote"
        exe = Path(sys.executable).parent / "sentencekv-eval"
        res = subprocess.run([str(exe), "all", "--base-url", srv.url, "--api-key", "secret", "--model", "served-skv",
                              "--tokenizer", model_path, "--policies", "full,sentencekv,streaming", "--out", str(out),
                              *SMALL], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert "memory" not in results["parts"] and "memory" not in results["config"]["parts"]
    servers = results["config"]["servers"]
    assert servers["sentencekv"]["budget"] == 192 and servers["sentencekv"]["block_size"] == 32, servers
    assert results["config"]["budget"] is None          # the server's own τ, not the harness default
    assert results["parts"]["niah"]["summary"]["sentencekv"]["fidelity"]        # token ids came back
    report = (out / "report.md").read_text()
    assert "τ = 192 tokens" in report and "block size 32" in report and "`served-skv`" in report, report[:600]
    assert (out / "samples.jsonl").read_text().count("\n") >= 3
