"""Extension point: ``AttentionBackendEnum`` -- registers the ``SENTENCEKV`` member.

A member added at run time is pickled by value; spawned EngineCore/worker processes unpickle the config before
plugins load and would fail with "'...' is not a valid AttentionBackendEnum". The member therefore reduces to a
call of :func:`resolve`, which registers on demand in whatever process unpickles it.
"""

from __future__ import annotations

from typing import Any

BACKEND_NAME = "SENTENCEKV"
CPU_BACKEND = "sentencekv_vllm.integration.cpu_backend.SentenceKVCPUBackend"
CUDA_BACKEND = "sentencekv_vllm.integration.cuda_backend.SentenceKVFlashBackend"


def backend_path(cpu: bool | None = None) -> str:
    """Class path of the SentenceKV backend for a CPU (``cpu=True``) or CUDA platform; default: this process's."""
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    return CPU_BACKEND if cpu else CUDA_BACKEND


def resolve(name: str = BACKEND_NAME) -> Any:
    """Return ``AttentionBackendEnum[name]``, registering it first if needed (also the unpickle hook)."""
    register_backend()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        return
    member = AttentionBackendEnum.register(BACKEND_NAME, backend_path())
    # Per-member override of Enum pickling (instance attribute wins over the class's __reduce_ex__).
    object.__setattr__(member, "__reduce_ex__", lambda _proto: (resolve, (BACKEND_NAME,)))


def is_sentencekv(backend: Any) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME
