"""A real Prometheus server (Debian's `prometheus` package) on loopback, scraping a test server."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from tests.server import free_port, stop


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> float | None:
        res = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        result = res["data"]["result"]
        return sum(float(r["value"][1]) for r in result) if result else None

    def wait_for(self, expr: str, predicate, timeout: float = 60) -> float:
        deadline = time.time() + timeout
        value = None
        while time.time() < deadline:
            value = self.query(expr)
            if value is not None and predicate(value):
                return value
            time.sleep(1)
        raise TimeoutError(f"{expr} never satisfied the condition (last value {value})")


@contextmanager
def prometheus_scraping(target_url: str) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is installed by scripts/setup.sh"
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
    target = target_url.split("://", 1)[1]
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: sentencekv\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                if requests.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield Prometheus(url)
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
