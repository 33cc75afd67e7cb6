"""GPU twin of :mod:`sentencekv_vllm.integration.worker` (kept apart so CPU processes never import it)."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from sentencekv_vllm.integration.memory import IndexReservingWorker
from sentencekv_vllm.integration.platform import ensure_v1_runner
from sentencekv_vllm.integration.state import attach_runner
from sentencekv_vllm.integration.trace import TraceRPC


class SentenceKVGPUWorker(IndexReservingWorker, TraceRPC, Worker):
    """vLLM's worker plus the runner hook; ``IndexReservingWorker`` takes the sentence index off the KV memory,
    ``TraceRPC`` answers the inspector's ``collective_rpc``."""

    def init_device(self) -> None:
        super().init_device()
        ensure_v1_runner(self.model_runner)
        attach_runner(self.model_runner, self.vllm_config)
