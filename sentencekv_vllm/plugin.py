"""Entry point of the ``vllm.general_plugins`` group: runs once in every vLLM process.

It registers the ``SENTENCEKV`` attention backend and teaches the platform to honour it. Nothing here imports
vLLM at module import time, so ``import sentencekv_vllm`` stays cheap.
"""

from __future__ import annotations

_done = False


def register() -> None:
    """Idempotent: vLLM calls it in the API server, the EngineCore and each worker."""
    global _done
    if _done:
        return
    from sentencekv_vllm.integration import platform, registry

    registry.register_backend()
    platform.install()
    _done = True
