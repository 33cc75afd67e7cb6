#!/usr/bin/env bash
# Serve the bundled default with SentenceKV: the test model (SmolLM2-135M-Instruct, converted by the set-up) under
# `vllm serve --attention-backend sentencekv` with configs/smollm2-cpu.yaml (budget 512 of an 8k context), on CPU.
# Runs scripts/setup.sh first if this checkout has not been set up. Once the server answers, prints its URL, a
# `curl` line to try and the retrieval inspector's address. Extra arguments go to `vllm serve` (they win over the
# config file), e.g. `scripts/serve.sh --max-num-seqs 4`.
#
# Environment: PORT (8000), HOST (127.0.0.1), CONFIG (configs/smollm2-cpu.yaml), VLLM_API_KEY (optional; the curl
# line then sends it), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 2), VLLM_PLUGINS (sentencekv,sentencekv_inspector).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAMP="$ROOT/.venv/.sentencekv-setup-v1"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  echo "serve.sh: setting up first (scripts/setup.sh)" >&2
  scripts/setup.sh
fi

PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
CONFIG=${CONFIG:-configs/smollm2-cpu.yaml}
MODEL=$(.venv/bin/python -m sentencekv_vllm.fixtures model)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
export VLLM_PLUGINS=${VLLM_PLUGINS:-sentencekv,sentencekv_inspector}
SERVED=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1])).get('served-model-name', ''))" \
         "$CONFIG")
SERVED=${SERVED:-$MODEL}
URL="http://$HOST:$PORT"
AUTH=""
if [ -n "${VLLM_API_KEY:-}" ]; then AUTH=' -H "Authorization: Bearer $VLLM_API_KEY"'; fi

# Announce once /health answers; the server itself replaces this shell (exec), so Ctrl-C and signals reach it.
SERVER_PID=$$
(
  for _ in $(seq 1 900); do
    kill -0 "$SERVER_PID" 2>/dev/null || exit 0
    if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
         "$URL/health" 2>/dev/null; then
      printf '\n==> SentenceKV is serving %s at %s/v1   (model: %s, config: %s)\n' "$SERVED" "$URL" "$MODEL" "$CONFIG"
      printf '    try:\n'
      printf '%s\n' "curl $URL/v1/completions$AUTH -H \"Content-Type: application/json\" -d '{\"model\": \"$SERVED\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'"
      printf '    retrieval inspector: %s/sentencekv/ui  (trace a request: "vllm_xargs": {"sentencekv_trace": true})\n\n' "$URL"
      exit 0
    fi
    sleep 1
  done
) &

exec .venv/bin/vllm serve "$MODEL" --config "$CONFIG" --attention-backend sentencekv --host "$HOST" --port "$PORT" \
  "$@"
