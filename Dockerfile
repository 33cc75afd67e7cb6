# syntax=docker/dockerfile:1
# GPU image: vLLM's official OpenAI-server runtime image plus this plugin, running as a non-root user (uid 1000).
#   docker build -t sentencekv-vllm:0.1.0-vllm0.32.0 .
#   docker run --gpus all --ipc=host -p 127.0.0.1:8000:8000 -e HF_TOKEN -e VLLM_API_KEY \
#     -v "$HOME/.cache/huggingface:/cache/huggingface" --user "$(id -u):$(id -g)" sentencekv-vllm:0.1.0-vllm0.32.0
# CPU build: Dockerfile.cpu. Install steps live in scripts/install.sh, which CI runs natively.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/sentencekv_vllm
COPY pyproject.toml README.md ./
COPY sentencekv_vllm ./sentencekv_vllm
COPY scripts/install.sh scripts/docker-entrypoint.sh ./scripts/
COPY configs ./configs
RUN scripts/install.sh cuda python3 cuda

# Unprivileged runtime user. Every cache lives under /cache (mode 1777), so the image also runs under any
# --user uid:gid, e.g. the host user owning a mounted Hugging Face cache (USER is set because such a uid has no
# passwd entry, and torch's compile cache asks getpass.getuser()).
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 vllm) \
    && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin vllm) \
    && mkdir -p /cache/huggingface /cache/vllm /cache/home \
    && chown -R 1000:1000 /cache && chmod -R 1777 /cache

ENV MODEL=meta-llama/Llama-3.1-8B-Instruct \
    SENTENCEKV_CONFIG=/opt/sentencekv_vllm/configs/llama-3.1-8b-32k.yaml \
    HOME=/cache/home \
    USER=vllm \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"]
ENTRYPOINT ["/opt/sentencekv_vllm/scripts/docker-entrypoint.sh"]
