"""Extension point: the current platform's backend selection and config hook.

* ``get_attn_backend_cls``: the CPU platform silently replaces any backend by CPU_ATTN; the wrapper returns the
  SentenceKV backend when it was asked for (and refuses what it cannot serve, with the reason). On CUDA it runs the
  FlashAttention backend's own ``validate_configuration`` (head size, dtype, block size, compute capability), which
  the CUDA platform would run for any selected backend.
* ``check_and_update_config``: validates ``--additional-config '{"sentencekv": {...}}'`` at start-up (API server,
  before any process is spawned), pins vLLM's V1 model runner, keeps attention out of CUDA graphs, and installs the
  SentenceKV worker, which gives the backend access to per-request state. Runs twice (API server, EngineCore):
  idempotent.
* ``VllmConfig.use_v2_model_runner``: answers ``False`` for a SentenceKV config in every process (see
  :func:`select_v1_model_runner`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from sentencekv_vllm.config import SentenceKVConfig, SentenceKVConfigError, resolve_request
from sentencekv_vllm.integration.compat import install_request_validator
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.registry import backend_path, is_sentencekv

CPU_WORKER = "sentencekv_vllm.integration.worker.SentenceKVCPUWorker"
GPU_WORKER = "sentencekv_vllm.integration.worker_gpu.SentenceKVGPUWorker"
_STOCK_WORKERS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker")
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
SUPPORTED_VLLM = "0.32."
V1_RUNNER_REASON = ("the SentenceKV backend reads the V1 model runner's persistent input batch (request ids and "
                    "token ids per row) and its request-removal hook, which Model Runner V2 does not have")


def install() -> None:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls, "_sentencekv_installed", False):
        return
    warning = version_warning()
    if warning:
        get_logger(__name__).warning(warning)
    _wrap_backend_selection(cls)
    _wrap_check_and_update_config(cls)
    _pin_v1_model_runner()
    cls._sentencekv_installed = True


def version_warning(version: str | None = None) -> str | None:
    """The plugin hooks private vLLM APIs (all in ``compat.py``, ``platform.py`` and the backends) that move between
    releases; it is written and tested against vLLM 0.32.x only. pip keeps other versions out through the extras'
    pins; if one is installed anyway, say so once per process instead of failing somewhere obscure."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.startswith(SUPPORTED_VLLM):
        return None
    return (f"SentenceKV supports vLLM {SUPPORTED_VLLM}x; this is vLLM {version}. Private vLLM APIs it uses may "
            "have changed: expect start-up errors or wrong attention; pin vllm==0.32.* (pip install "
            "'sentencekv-vllm[cuda]') or check sentencekv_vllm/integration/compat.py against this release.")


def _wrap_backend_selection(cls: type) -> None:
    original = cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(klass, selected_backend, attn_selector_config, num_heads=None) -> str:
        if not is_sentencekv(selected_backend):
            return original(klass, selected_backend, attn_selector_config, num_heads=num_heads)
        return select_backend(klass, attn_selector_config)

    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def select_backend(platform_cls: type, sel: Any) -> str:
    """Class path of the SentenceKV backend for this platform, or ``ValueError`` with every reason it cannot serve
    the layer described by the selector config ``sel``."""
    cpu = _is_cpu(platform_cls)
    reasons = unsupported_reasons(sel)
    if not cpu:
        reasons += device_reasons(platform_cls, sel)
    if reasons:
        raise ValueError("The SENTENCEKV attention backend cannot serve this model: " + "; ".join(reasons))
    return backend_path(cpu=cpu)


def _is_cpu(platform_cls: type) -> bool:
    from vllm.platforms.interface import PlatformEnum

    return getattr(platform_cls, "_enum", None) == PlatformEnum.CPU


def device_reasons(platform_cls: type, sel: Any) -> list[str]:
    """FlashAttention's own checks for the CUDA backend (it subclasses ``FlashAttentionBackend``).

    The CUDA platform runs ``validate_configuration`` for a selected backend before returning it; returning our
    class path directly would skip that, and an unsupported head size or a pre-Ampere GPU would then fail deep in
    the kernel instead of at start-up with the reason."""
    from sentencekv_vllm.integration.cuda_backend import SentenceKVFlashBackend

    capability = platform_cls.get_device_capability()
    if capability is None:
        return ["no CUDA device capability (is a GPU visible?)"]
    return list(SentenceKVFlashBackend.validate_configuration(device_capability=capability, **sel._asdict()))


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
    if getattr(sel, "use_non_causal", False):
        reasons.append("non-causal attention (sentence selection assumes causal decoding)")
    if getattr(sel, "use_pcp", False) or getattr(sel, "use_dcp", False):
        reasons.append("context parallelism (the sentence index is per request on one rank)")
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
    if cache.enable_prefix_caching and cfg.offload == "host":
        # The host tier returns spilled blocks to vLLM's free pool while the request still maps them; a prefix hit
        # on such a block would share a block whose owner no longer holds it. (Without the tier, hits are capped so
        # the observation window is recomputed: ``prefix_cache.py``.)
        logger.warning("SentenceKV: disabling prefix caching (not combined with offload: host yet)")
        cache.enable_prefix_caching = False
    select_v1_model_runner(vllm_config)
    keep_attention_out_of_cuda_graphs(vllm_config)
    _install_connector(vllm_config, cfg)
    from sentencekv_vllm.integration.trace import trace_dir

    trace_dir(cfg.trace_dir)    # an operator's trace directory (if any) is created here, failing early if bad
    _check_spacy_model(cfg)
    parallel = vllm_config.parallel_config
    if parallel.worker_cls in _STOCK_WORKERS:
        parallel.worker_cls = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
    elif not parallel.worker_cls.startswith("sentencekv_vllm."):
        raise ValueError(f"--worker-cls {parallel.worker_cls} cannot be combined with the SENTENCEKV backend, "
                         "which installs its own worker.")
    install_request_validator(functools.partial(resolve_request, cfg,
                                                max_model_len=vllm_config.model_config.max_model_len))
    if not getattr(vllm_config, "_sentencekv_logged", False):
        logger.info("SentenceKV enabled: %s", cfg.to_dict())
        object.__setattr__(vllm_config, "_sentencekv_logged", True)
    return cfg


def _check_spacy_model(cfg: SentenceKVConfig) -> None:
    """``segmentation: spacy`` loads ``spacy_model`` in the worker at start-up; a name spaCy cannot load is refused
    here first, naming the key, before any engine process starts."""
    if cfg.segmentation != "spacy":
        return
    from sentencekv_vllm.core.segmentation import spacy_pipeline_missing

    why = spacy_pipeline_missing(cfg.spacy_model)
    if why:
        raise SentenceKVConfigError("spacy_model", f"{cfg.spacy_model!r}: {why}")


def select_v1_model_runner(vllm_config: Any) -> None:
    """Run vLLM's V1 model runner (see ``V1_RUNNER_REASON`` for why).

    vLLM 0.32 picks the runner per process in ``VllmConfig.use_v2_model_runner``: ``VLLM_USE_V2_MODEL_RUNNER`` if
    set, else V2 whenever Triton imports -- i.e. on every CUDA install. Two things make the choice V1 everywhere:
    this sets ``VLLM_USE_V2_MODEL_RUNNER=0`` in the API server before EngineCore and the workers are spawned (they
    inherit the environment, and vLLM code that reads the variable directly agrees), and
    :func:`_pin_v1_model_runner` makes the property answer ``False`` for a SentenceKV config in every process
    that loaded the plugin, including decisions vLLM takes earlier in ``VllmConfig.__post_init__`` than this hook.
    An explicit request for V2, or a feature that forces V2, is refused with the reason.
    """
    requested = os.environ.get(V2_RUNNER_ENV)
    if requested is not None and _env_true(requested):
        raise ValueError(f"The SENTENCEKV attention backend needs vLLM's V1 model runner ({V1_RUNNER_REASON}); "
                         f"unset {V2_RUNNER_ENV}={requested} or set it to 0.")
    for feature, present in (("HiSparse", getattr(vllm_config.attention_config, "hisparse_config", None)),
                             ("watermarking", getattr(vllm_config, "watermark_config", None))):
        if present is not None:
            raise ValueError(f"{feature} requires vLLM's Model Runner V2, which the SENTENCEKV attention backend "
                             f"cannot use ({V1_RUNNER_REASON}).")
    if requested is None:
        os.environ[V2_RUNNER_ENV] = "0"
        get_logger(__name__).info("SentenceKV: using vLLM's V1 model runner (%s=0; V2 is vLLM's default when "
                                  "Triton is installed): %s.", V2_RUNNER_ENV, V1_RUNNER_REASON)


def _env_true(value: str) -> bool:
    """vLLM's own parsing of boolean variables (``envs.maybe_convert_bool``: ``bool(int(value))``)."""
    try:
        return bool(int(value))
    except ValueError as err:
        raise ValueError(f"{V2_RUNNER_ENV} must be 0 or 1, got {value!r}") from err


def _pin_v1_model_runner() -> None:
    """Make ``VllmConfig.use_v2_model_runner`` answer ``False`` for a SentenceKV config (see
    :func:`select_v1_model_runner`); any other config gets vLLM's own answer. Idempotent."""
    from vllm.config import VllmConfig

    prop = VllmConfig.__dict__.get("use_v2_model_runner")
    if not isinstance(prop, property) or getattr(prop.fget, "_sentencekv", False):
        return
    stock = prop.fget

    @functools.wraps(stock)
    def use_v2_model_runner(self) -> bool:
        if uses_sentencekv(self):
            return False
        return stock(self)

    use_v2_model_runner._sentencekv = True  # type: ignore[attr-defined]
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)


def ensure_v1_runner(runner: Any) -> None:
    """Fail at start-up, with the reason, if the worker built a runner SentenceKV cannot drive."""
    missing = [attr for attr in ("input_batch", "requests", "_on_request_state_removed") if not hasattr(runner, attr)]
    if missing:
        raise RuntimeError(f"SentenceKV needs vLLM's V1 model runner ({V1_RUNNER_REASON}), but the worker built "
                           f"{type(runner).__module__}.{type(runner).__qualname__} (no {', '.join(missing)}); "
                           f"set {V2_RUNNER_ENV}=0.")


def keep_attention_out_of_cuda_graphs(vllm_config: Any) -> None:
    """Decode steps must run SentenceKV's Python forward (plan, running sums, selection), so attention stays
    outside CUDA graphs and the rest of the model uses piecewise graphs.

    The CUDA builder declares ``AttentionCGSupport.NEVER``, and vLLM's runner would downgrade the default
    ``FULL_AND_PIECEWISE`` to ``PIECEWISE`` by itself when it resolves the mode; doing it here states the reason
    once, in the API server, and turns an explicit full-graph request into a start-up error instead of a
    downgrade deep in the worker. ``PIECEWISE`` / ``NONE`` are left alone.

    The attention + output-quant fusion pass (on by default for quantised models) is turned off too: it removes
    attention from the splitting ops and switches vLLM to FULL graphs, and the sparse path does not quantise its
    output."""
    from vllm.config import CUDAGraphMode

    comp = vllm_config.compilation_config
    passes = getattr(comp, "pass_config", None)
    if getattr(passes, "fuse_attn_quant", False):
        passes.fuse_attn_quant = False
        get_logger(__name__).info("SentenceKV: attention + quant fusion off (attention must stay a graph split "
                                  "point and the sparse path writes unquantised output).")
    mode = comp.cudagraph_mode
    if mode is None or not mode.has_full_cudagraphs():
        return
    if mode != CUDAGraphMode.FULL_AND_PIECEWISE:
        raise ValueError(f"cudagraph_mode={mode.name} captures attention inside full CUDA graphs, where the "
                         "SENTENCEKV backend's per-step selection cannot run; use the default (PIECEWISE with "
                         "this backend), -cc.cudagraph_mode=PIECEWISE or --enforce-eager.")
    comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
    get_logger(__name__).info("SentenceKV: cudagraph_mode FULL_AND_PIECEWISE -> PIECEWISE (attention runs outside "
                              "CUDA graphs: each decode step plans and selects sentences in Python; the rest of "
                              "the model still replays piecewise graphs).")


def _install_connector(vllm_config: Any, cfg: SentenceKVConfig) -> None:
    """Attach the SentenceKV KV connector to every SentenceKV server: ``offload: host`` rides on it (scheduler ->
    worker metadata each step), and it is vLLM's supported route for worker-side statistics to reach the API
    server's ``/metrics`` (KV-connector stats). Another connector is refused with the host tier; without it, the
    user's connector is kept and the ``sentencekv_*`` series are not exported (logged)."""
    from vllm.config import KVTransferConfig

    from sentencekv_vllm.integration.connector import CONNECTOR_NAME, transfer_config

    current = vllm_config.kv_transfer_config
    if current is not None and current.kv_connector not in (None, CONNECTOR_NAME):
        if cfg.offload == "host":
            raise ValueError(f"sentencekv.offload: 'host' uses its own KV connector; it cannot be combined with "
                             f"--kv-transfer-config kv_connector={current.kv_connector!r}")
        get_logger(__name__).warning("SentenceKV: --kv-transfer-config kv_connector=%r is kept; the sentencekv_* "
                                     "metrics travel through SentenceKV's own connector and are not exported.",
                                     current.kv_connector)
        return
    if current is None or current.kv_connector is None:
        vllm_config.kv_transfer_config = KVTransferConfig(**transfer_config())
    from vllm.platforms import current_platform

    from sentencekv_vllm.integration.memory import resolve_host_pool

    extra = vllm_config.kv_transfer_config.kv_connector_extra_config
    resolve_host_pool(cfg, vllm_config, extra, cpu=current_platform.is_cpu())
