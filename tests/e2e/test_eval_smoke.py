"""Issue #6 / #18: `sentencekv-eval all --quick` runs end to end against real servers and writes its report, the
per-sample JSONL, greedy agreement with FULL and serving percentiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import servers

pytestmark = pytest.mark.slow


def test_quick_eval_writes_report(tmp_path: Path):
    out = tmp_path / "quick"
    exe = Path(sys.executable).parent / "sentencekv-eval"
    # float32: on AVX2-only CPUs bf16 matmuls are emulated; small grids (the remote test uses the same ones):
    # this checks that every part runs and reports on servers the harness starts itself (stock vLLM for FULL, a
    # quest server, the memory part's pool-sized servers), not the numbers. The sentence policies are evaluated
    # per request on the shared server (tests/e2e/shared/test_eval_remote.py): each server start costs a minute.
    args = [str(exe), "all", *servers.EVAL_SMALL_GRID, "--dtype", "float32", "--out", str(out),
            "--policies", "full,quest", "--bench-policies", "quest",
            "--additional-config", json.dumps(servers.EVAL_EXTRA)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.terminate()                      # SIGTERM: the harness stops its servers (SIGKILL would orphan them)
        _, stderr = proc.communicate(timeout=120)
        pytest.fail("sentencekv-eval all took over 20 min:\n" + stderr[-4000:])
    assert proc.returncode == 0, stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert {"niah", "synthetic", "qa", "ppl", "lengths", "lengths_t07", "serve-bench", "memory"} <= set(parts)
    ppl = {p: rows[0]["ppl"] for p, rows in parts["ppl"]["per_policy"].items()}
    assert len(ppl) == 2 and max(ppl.values()) < 1.05 * min(ppl.values()), ppl   # exact prefill everywhere
    for part in ("niah", "synthetic"):
        assert set(parts[part]["summary"]) == {"full", "quest"}
        assert "negative_share" in parts[part]["summary"]["quest"]
        fidelity = parts[part]["summary"]["quest"]["fidelity"]
        assert fidelity and all(0 <= f["top1_match"] <= 1 and f["n"] > 0 for f in fidelity.values()), fidelity
    assert not any(t.startswith("ruler") for t in parts["synthetic"]["summary"]["full"]["accuracy"])
    point = parts["serve-bench"]["per_policy"]["quest"]["grid"][0]
    assert point["tpot_s"] > 0 and point["ttft_s_p50"] <= point["ttft_s_p99"] and point["itl_s_p90"] > 0
    memory = {row["engine"]: row for row in parts["memory"]["rows"]}
    assert 0 < memory["sentencekv hot=1"]["blocks_per_request"] < memory["full"]["blocks_per_request"]
    served = results["config"]["servers"]
    assert served["quest"]["budget"] == 256 and served["full"]["block_size"] > 0, served
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {row["part"] for row in lines} >= {"niah", "synthetic", "qa", "lengths"}
    assert all("output" in row and "policy" in row for row in lines)
    report = (out / "report.md").read_text()
    assert "Needle in a haystack" in report and "| quest |" in report
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in report and "Q4_1 GGUF" in report
    assert "top-1 match share" in report and "ITL p99" in report
    assert (out / "niah_heatmap.png").stat().st_size > 5000 and (out / "latency_cdf.png").exists()
    assert (out / "memory.png").exists() and "![memory and concurrency]" in report
    assert results["config"]["vllm"].startswith("0.32")
