"""scripts/gpu_smoke.sh cannot run without a GPU; here: it parses, its driver imports, and what it greps the server
log for is what the plugin logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_shell_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr


def test_driver_imports_and_shows_help():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--help"], capture_output=True,
                         text=True, check=False, timeout=120)
    assert res.returncode == 0 and "--checks" in res.stdout, res.stderr[-2000:]


def test_startup_facts_match_the_plugins_log_lines():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_smoke
    finally:
        sys.path.pop(0)
    platform_src = (ROOT / "sentencekv_vllm" / "integration" / "platform.py").read_text()
    assert "V1 model runner" in platform_src and "FULL_AND_PIECEWISE -> PIECEWISE" in platform_src
    ok, _ = gpu_smoke.startup_facts("SentenceKV: using vLLM's V1 model runner ...\n"
                                    "SentenceKV: cudagraph_mode FULL_AND_PIECEWISE -> PIECEWISE (...)")
    assert ok
    assert not gpu_smoke.startup_facts("Using V2 Model Runner\nV1 model runner FULL_AND_PIECEWISE -> PIECEWISE")[0]
    text = 'sentencekv_spilled_blocks_total 3.0\nvllm:sentencekv_spilled_blocks_total{engine="0"} 2.0\n'
    assert gpu_smoke.metric(text, "sentencekv_spilled_blocks_total") == 5.0
    rows = [gpu_smoke.Row("a", "b", True), gpu_smoke.Row("c", "d", False, "e")]
    assert "**NO**" in gpu_smoke.table(rows)
