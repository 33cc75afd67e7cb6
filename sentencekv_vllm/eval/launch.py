"""Start a real ``vllm serve`` subprocess (loopback only, killed on exit); used by the eval harness and tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

VENV_BIN = Path(sys.executable).parent   # the `vllm` next to this interpreter
# defaults for the servers the harness starts; the caller's environment wins (e.g. VLLM_CPU_KVCACHE_SPACE=8 for a
# benchmark whose KV does not fit 2 GiB)
BASE_ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=30).text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def vllm_server(model: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Iterator[Server]:
    """``vllm serve model *args`` on a free loopback port; yields once ``/health`` answers.

    ``PROMETHEUS_MULTIPROC_DIR`` is not inherited (only ``env`` can set it): the sentencekv_* series must reach
    ``/metrics`` on a plain server, and the tests that read them prove it."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    full_env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    full_env.update({**{k: v for k, v in BASE_ENV.items() if k not in os.environ}, **(env or {})})
    cmd = [str(VENV_BIN / "vllm"), "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{_failure_summary(log.read_text())}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not ready after {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Server(url, proc, log)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_serve_expecting_failure(model: str, *args: str, timeout: float = 240) -> tuple[int, str]:
    """Run ``vllm serve`` that must fail at start-up; returns (exit code, combined output)."""
    cmd = [str(VENV_BIN / "vllm"), "serve", model, "--port", str(free_port()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **BASE_ENV})
    return res.returncode, res.stdout + res.stderr


def _failure_summary(text: str) -> str:
    """The first error line (the root cause; vLLM's engine-startup traceback buries it) plus the log's tail."""
    causes = [line for line in text.splitlines() if re.search(r"\b\w+(Error|Exception): ", line)
              and " WARNING " not in line and "Engine core initialization" not in line]
    head = f"root cause: {causes[0]}\n" if causes else ""
    return head + text[-4000:]
