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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_run_as_non_root(dockerfile):
    users = re.findall(r"^USER\s+(\S+)", (ROOT / dockerfile).read_text(), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def test_readme_docker_run_example():
    """The GPU user's `docker run`: GPUs, the HF token, the HF cache volume, host IPC (PyTorch shared memory)."""
    readme = (ROOT / "README.md").read_text()
    runs = [block for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S) if "docker run" in block]
    assert any(all(flag in block for flag in ("--gpus all", "-e HF_TOKEN", "--ipc=host", "huggingface"))
               for block in runs), runs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yaml").read_text())


def test_compose_matches_compose_spec():
    res = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
              str(DEPLOY / "compose" / "docker-compose.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    services = compose()["services"]
    assert {"vllm", "prometheus", "grafana"} <= set(services)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / "compose" / src).resolve().exists(), vol


def test_compose_is_private_by_default():
    """Issue #17: ports bound to 127.0.0.1 unless BIND_ADDRESS says otherwise; API key and Grafana admin password
    required from the environment; no anonymous Grafana."""
    services = compose()["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    assert services["vllm"]["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_k8s_manifests_validate():
    from kubernetes_validate import validate

    docs = k8s_docs("sentencekv.yaml")
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    for doc in docs + k8s_docs("secret.yaml"):
        validate(doc, "1.30", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe", "resources"} <= set(container)
    serve = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.yaml"])
    assert serve["attention-backend"] == "sentencekv"


def test_k8s_deployment_is_hardened():
    """Issue #17: non-root, no privilege escalation, API key from a Secret, model cache on a PVC, pinned tag."""
    docs = k8s_docs("sentencekv.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in container["env"]}
    secret = k8s_docs("secret.yaml")[0]
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["kind"] == "Secret" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"] and not ref.get("optional", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/cache/huggingface")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    image = container["image"]
    assert ":" in image and not image.endswith((":latest", ":main")), image
    assert image == compose()["services"]["vllm"]["image"], "compose and k8s run the same pinned image"


def test_k8s_service_monitor_matches_the_service():
    monitor = k8s_docs("optional/servicemonitor.yaml")[0]
    service = next(d for d in k8s_docs("sentencekv.yaml") if d["kind"] == "Service")
    assert monitor["kind"] == "ServiceMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_placeholder_api_key_is_refused_by_the_entrypoint():
    res = subprocess.run(["bash", "scripts/docker-entrypoint.sh"], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "VLLM_API_KEY": "CHANGE-ME", "MODEL": "m",
                              "SENTENCEKV_CONFIG": "c"}, check=False)
    assert res.returncode == 64 and "placeholder" in res.stderr


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


def test_grafana_dashboard_selects_model_and_never_sums_a_gauge():
    """Issue #17: every query is filtered by the dashboard's ``model_name`` variable (vLLM's label, which the
    sentencekv_* series carry too), and gauges are shown per replica: a sum of e.g. KV usage % or host blocks over
    replicas means nothing."""
    from sentencekv_vllm.integration.metrics import ATTENDED_MAX, BUDGET, GAUGE, SERIES

    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "sentencekv.json").read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["model_name"]
    gauges = {s.name for s in SERIES if s.kind == GAUGE} | {BUDGET, ATTENDED_MAX, "vllm:num_requests_running",
                                                              "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in exprs:
        assert 'model_name=~"$model_name"' in expr, expr
        for gauge in gauges:
            assert not re.search(r"\bsum\s*(by\s*\([^)]*\)\s*)?\(\s*" + re.escape(gauge) + r"\b", expr), expr
    assert any("sentencekv_host_blocks" in e for e in exprs) and any("kv_cache_usage_perc" in e for e in exprs)
