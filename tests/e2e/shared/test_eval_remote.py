"""Issue #18: ``sentencekv-eval`` pointed at a running server (the shared one): every policy selected per request,
the server's own τ and block size reported, no memory part (it sizes pools of servers it starts itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import servers

pytestmark = pytest.mark.slow


def test_eval_against_a_running_server(tmp_path: Path, model_path: str, shared):
    out = tmp_path / "remote"
    exe = Path(sys.executable).parent / "sentencekv-eval"
    res = subprocess.run([str(exe), "all", "--base-url", shared.url, "--api-key", "x", "--model", "smollm2",
                          "--tokenizer", model_path, "--policies", "full,sentencekv", "--out", str(out),
                          *servers.EVAL_SMALL_GRID], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert "memory" not in results["parts"] and "memory" not in results["config"]["parts"]
    served = results["config"]["servers"]
    assert served["sentencekv"]["budget"] == 512 and served["sentencekv"]["block_size"] == 32, served
    assert results["config"]["budget"] is None          # the server's own τ, not the harness default
    assert results["parts"]["niah"]["summary"]["sentencekv"]["fidelity"]        # token ids came back
    report = (out / "report.md").read_text()
    assert "τ = 512 tokens" in report and "block size 32" in report and "`smollm2`" in report, report[:600]
    assert (out / "samples.jsonl").read_text().count("\n") >= 3
