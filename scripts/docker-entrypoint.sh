#!/usr/bin/env bash
# Container entrypoint: a clean Prometheus multiprocess dir (so worker-side sentencekv_* series reach /metrics),
# then `vllm serve $MODEL --config $SENTENCEKV_CONFIG` plus any extra arguments given to the container.
set -euo pipefail
if [ "${VLLM_API_KEY:-}" = "CHANGE-ME" ]; then   # the placeholder of deploy/k8s/secret.yaml
  echo "VLLM_API_KEY is still the placeholder 'CHANGE-ME': set a real key (e.g. openssl rand -hex 32)" >&2
  exit 64
fi
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi
exec vllm serve "${MODEL:?set MODEL}" --host 0.0.0.0 --port "${PORT:-8000}" \
  --attention-backend sentencekv --config "${SENTENCEKV_CONFIG:?set SENTENCEKV_CONFIG}" "$@"
