"""Issue #17: the README's first command, ``scripts/serve.sh``, serves the bundled default with SentenceKV and prints
a ``curl`` line that works as printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_serve_script_prints_a_working_curl_line():
    port = free_port()
    env = {**os.environ, "PORT": str(port), "VLLM_API_KEY": ""}
    proc = subprocess.Popen([str(ROOT / "scripts" / "serve.sh"), "--enforce-eager"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not any(x.startswith("curl ") for x in lines):
            time.sleep(1)
        curl = next((x for x in lines if x.startswith("curl ")), None)
        assert curl, "no curl line printed:\n" + "".join(lines[-60:])
        assert any(f"at http://127.0.0.1:{port}/v1" in x for x in lines)
        assert any("/sentencekv/ui" in x for x in lines)
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True).stdout
        answer = json.loads(out)
        assert answer["model"] == "smollm2" and answer["choices"][0]["text"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
