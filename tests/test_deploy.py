"""Issue #7 (static part): Dockerfiles lint clean, compose / k8s / Prometheus / Grafana files validate."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_lints_clean(dockerfile):
    res = run(str(BIN / "hadolint"), "--config", ".hadolint.yaml", dockerfile)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / dockerfile).read_text()
    assert "HEALTHCHECK" in text and "scripts/install.sh" in text


def test_compose_matches_compose_spec():
    res = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
              str(DEPLOY / "compose" / "docker-compose.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yaml").read_text())
    assert {"vllm", "prometheus", "grafana"} <= set(compose["services"])
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / "compose" / src).resolve().exists(), vol


def test_k8s_manifests_validate():
    from kubernetes_validate import validate

    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "sentencekv.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    for doc in docs:
        validate(doc, "1.30", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe", "resources"} <= set(container)
    serve = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.yaml"])
    assert serve["attention-backend"] == "sentencekv"


def test_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package (promtool) is installed by scripts/setup.sh"
    res = run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_dashboard_uses_exported_series():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "sentencekv.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    from sentencekv_vllm.integration import metrics

    exported = set(re.findall(r'"(sentencekv_[a-z_]+)"', Path(metrics.__file__).read_text()))
    used = set(re.findall(r"(sentencekv_[a-z_]+?)(?:_bucket|_total|_sum|_count)?\b", exprs))
    assert used and used <= exported, used - exported
    assert "vllm:time_to_first_token_seconds_bucket" in exprs
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["uid"] == {t["datasource"]["uid"] for t in dash["panels"]}.pop()
