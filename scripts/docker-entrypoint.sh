#!/usr/bin/env bash
# Container entrypoint: refuse the placeholder API key, then `vllm serve $MODEL --config $SENTENCEKV_CONFIG`
# plus any extra arguments given to the container.
set -euo pipefail
if [ "${VLLM_API_KEY:-}" = "CHANGE-ME" ]; then   # the placeholder of deploy/k8s/secret.yaml
  echo "VLLM_API_KEY is still the placeholder 'CHANGE-ME': set a real key (e.g. openssl rand -hex 32)" >&2
  exit 64
fi
exec vllm serve "${MODEL:?set MODEL}" --host 0.0.0.0 --port "${PORT:-8000}" \
  --attention-backend sentencekv --config "${SENTENCEKV_CONFIG:?set SENTENCEKV_CONFIG}" "$@"
