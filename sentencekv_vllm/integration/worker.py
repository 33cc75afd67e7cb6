"""Extension point: ``parallel_config.worker_cls`` (set by ``platform.prepare_config``).

The worker owns the model runner; the attention builder has no request ids, so the worker hands its runner to the
per-process SentenceKV state and frees a request's state when the runner drops it (finish or abort). Only vLLM's
V1 runner has what that needs (``platform.select_v1_model_runner`` selects it; ``ensure_v1_runner`` checks).
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from sentencekv_vllm import native
from sentencekv_vllm.integration.memory import IndexReservingWorker
from sentencekv_vllm.integration.platform import ensure_v1_runner
from sentencekv_vllm.integration.state import attach_runner
from sentencekv_vllm.integration.trace import TraceRPC


class SentenceKVCPUWorker(IndexReservingWorker, TraceRPC, CPUWorker):
    """vLLM's worker plus the runner hook; ``IndexReservingWorker`` takes the sentence index off the KV memory,
    ``TraceRPC`` answers the inspector's ``collective_rpc``."""

    def init_device(self) -> None:
        super().init_device()
        ensure_v1_runner(self.model_runner)
        attach_runner(self.model_runner, self.vllm_config)
        native.library()        # built (or found in the cache) and logged at start-up, not at the first decode
