# syntax=docker/dockerfile:1
# GPU image: vLLM's official OpenAI-server runtime image plus this plugin.
#   docker build -t sentencekv-vllm .
#   docker run --gpus all -p 8000:8000 -e MODEL=meta-llama/Llama-3.1-8B-Instruct sentencekv-vllm
# CPU build: Dockerfile.cpu. Install steps live in scripts/install.sh, which CI runs natively.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/sentencekv_vllm
COPY pyproject.toml README.md ./
COPY sentencekv_vllm ./sentencekv_vllm
COPY scripts/install.sh scripts/docker-entrypoint.sh ./scripts/
COPY configs ./configs
RUN scripts/install.sh cuda python3 cuda

ENV MODEL=meta-llama/Llama-3.1-8B-Instruct \
    SENTENCEKV_CONFIG=/opt/sentencekv_vllm/configs/llama-3.1-8b-32k.yaml \
    PROMETHEUS_MULTIPROC_DIR=/tmp/sentencekv-prometheus
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"]
ENTRYPOINT ["/opt/sentencekv_vllm/scripts/docker-entrypoint.sh"]
