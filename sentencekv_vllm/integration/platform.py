"""Extension point: the current platform's backend selection and config hook.

* ``get_attn_backend_cls``: the CPU platform silently replaces any backend by CPU_ATTN; the wrapper returns the
  SentenceKV backend when it was asked for (and refuses what it cannot serve, with the reason).
* ``check_and_update_config``: validates ``--additional-config '{"sentencekv": {...}}'`` at start-up (API server,
  before any process is spawned) and installs the SentenceKV worker, which gives the backend access to per-request
  state. Runs twice (API server, EngineCore): idempotent.
"""

from __future__ import annotations

import functools
from typing import Any

from sentencekv_vllm.config import SentenceKVConfig, SentenceKVConfigError
from sentencekv_vllm.integration.compat import install_request_validator
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.registry import backend_path, is_sentencekv

CPU_WORKER = "sentencekv_vllm.integration.worker.SentenceKVCPUWorker"
GPU_WORKER = "sentencekv_vllm.integration.worker_gpu.SentenceKVGPUWorker"
_STOCK_WORKERS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker")


def install() -> None:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls, "_sentencekv_installed", False):
        return
    _wrap_backend_selection(cls)
    _wrap_check_and_update_config(cls)
    cls._sentencekv_installed = True


def _wrap_backend_selection(cls: type) -> None:
    original = cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(klass, selected_backend, attn_selector_config, num_heads=None) -> str:
        if not is_sentencekv(selected_backend):
            return original(klass, selected_backend, attn_selector_config, num_heads=num_heads)
        reasons = unsupported_reasons(attn_selector_config)
        if reasons:
            raise ValueError("The SENTENCEKV attention backend cannot serve this model: " + "; ".join(reasons))
        return backend_path()

    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def unsupported_reasons(sel: Any) -> list[str]:
    """What the selector asks for that SentenceKV does not implement (decoder-only, non-MLA, unquantised KV)."""
    reasons = []
    if getattr(sel, "use_mla", False):
        reasons.append("MLA models are not supported")
    if getattr(sel, "use_sparse", False):
        reasons.append("model-native sparse attention is not supported")
    if getattr(sel, "attn_type", "decoder") not in ("decoder", None):
        reasons.append(f"attention type {sel.attn_type!r} (only decoder self-attention)")
    if str(getattr(sel, "kv_cache_dtype", "auto")) not in ("auto", "bfloat16", "float16", "float32"):
        reasons.append(f"kv_cache_dtype {sel.kv_cache_dtype!r} (quantised KV caches are not supported)")
    if getattr(sel, "has_sliding_window", False):
        reasons.append("sliding-window layers")
    return reasons


def _wrap_check_and_update_config(cls: type) -> None:
    original = cls.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(klass, vllm_config) -> None:
        if uses_sentencekv(vllm_config):
            prepare_config(vllm_config)
        original(klass, vllm_config)

    cls.check_and_update_config = classmethod(check_and_update_config)


def uses_sentencekv(vllm_config: Any) -> bool:
    attn = getattr(vllm_config, "attention_config", None)
    return attn is not None and is_sentencekv(getattr(attn, "backend", None))


def prepare_config(vllm_config: Any) -> SentenceKVConfig:
    """Validate hyper-parameters and the engine features SentenceKV relies on; install the worker."""
    from vllm.platforms import current_platform

    logger = get_logger(__name__)
    cfg = SentenceKVConfig.from_additional_config(vllm_config.additional_config)
    if vllm_config.speculative_config is not None:
        raise ValueError("The SENTENCEKV attention backend does not support speculative decoding "
                         "(decode steps must have one query token per request).")
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        # A prefix-cache hit skips the prompt's last queries, which SnapKV retention needs: the index (and so the
        # output) would then depend on what ran before. Indexes are not cached per prefix yet.
        logger.warning("SentenceKV: disabling prefix caching (the sentence index needs the prompt's own queries)")
        cache.enable_prefix_caching = False
    if cfg.offload == "host":
        _install_connector(vllm_config)
    if cfg.trace_requests > 0:
        from sentencekv_vllm.integration.trace import trace_dir

        trace_dir()     # creates $SENTENCEKV_TRACE_DIR here, before the engine processes are spawned
    parallel = vllm_config.parallel_config
    if parallel.worker_cls in _STOCK_WORKERS:
        parallel.worker_cls = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
    elif not parallel.worker_cls.startswith("sentencekv_vllm."):
        raise ValueError(f"--worker-cls {parallel.worker_cls} cannot be combined with the SENTENCEKV backend, "
                         "which installs its own worker.")
    install_request_validator(functools.partial(validate_request_args, cfg,
                                                vllm_config.model_config.max_model_len))
    if not getattr(vllm_config, "_sentencekv_logged", False):
        logger.info("SentenceKV enabled: %s", cfg.to_dict())
        object.__setattr__(vllm_config, "_sentencekv_logged", True)
    return cfg


def validate_request_args(cfg: SentenceKVConfig, max_model_len: int, extra_args: dict[str, Any]) -> None:
    """Per-request ``sentencekv_*`` overrides: same rules as the server config, plus the budget must not exceed
    ``max_model_len`` and the policy must use the server's unit kind (sentences vs Quest pages)."""
    req = cfg.with_request_overrides(extra_args)
    if req.budget > max_model_len:
        raise SentenceKVConfigError("budget", f"must be <= max_model_len ({max_model_len}), got {req.budget}")
    if (req.policy == "quest") != (cfg.policy == "quest"):
        raise SentenceKVConfigError("policy", f"{req.policy!r} cannot be requested on a server running "
                                    f"policy {cfg.policy!r} (different index units)")


def _install_connector(vllm_config: Any) -> None:
    """``offload: host`` rides on the KV connector API (scheduler -> worker metadata each step)."""
    from vllm.config import KVTransferConfig

    from sentencekv_vllm.integration.connector import CONNECTOR_NAME, transfer_config

    current = vllm_config.kv_transfer_config
    if current is not None and current.kv_connector not in (None, CONNECTOR_NAME):
        raise ValueError(f"sentencekv.offload: 'host' uses its own KV connector; it cannot be combined with "
                         f"--kv-transfer-config kv_connector={current.kv_connector!r}")
    if current is None:
        vllm_config.kv_transfer_config = KVTransferConfig(**transfer_config())
