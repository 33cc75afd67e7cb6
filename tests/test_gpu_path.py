"""Issue #15 items 1, 3, 8 on a CPU: the decisions the CUDA path depends on, made by vLLM's own code where possible.

* Model runner: SentenceKV forces vLLM's V1 runner (V2 is the default wherever Triton imports, i.e. every CUDA
  install, and has no ``input_batch`` / ``_on_request_state_removed``).
* CUDA graphs: the CUDA builder declares ``AttentionCGSupport.NEVER``; vLLM's own resolver then turns the default
  FULL_AND_PIECEWISE into PIECEWISE (attention outside the graphs) and refuses FULL.
* Backend selection on CUDA runs FlashAttention's ``validate_configuration`` (head size, compute capability).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


@pytest.fixture(scope="module")
def plugin():
    from sentencekv_vllm.integration import platform, registry
    from sentencekv_vllm.plugin import register

    register()
    return SimpleNamespace(platform=platform, registry=registry, member=registry.resolve())


def sentencekv_config(member, **extra):
    attn = SimpleNamespace(backend=member, hisparse_config=extra.pop("hisparse_config", None))
    return SimpleNamespace(attention_config=attn, **extra)


# -- item 1: model runner ----------------------------------------------------------------------------------------

def test_v1_runner_is_selected_and_exported_to_child_processes(plugin, monkeypatch):
    monkeypatch.delenv(V2_ENV, raising=False)
    plugin.platform.select_v1_model_runner(sentencekv_config(plugin.member))
    import os

    assert os.environ[V2_ENV] == "0"      # inherited by EngineCore and the workers, spawned after this hook
    import vllm.envs as envs

    assert envs.VLLM_USE_V2_MODEL_RUNNER is False


def test_explicit_v2_request_is_refused_with_the_reason(plugin, monkeypatch):
    monkeypatch.setenv(V2_ENV, "1")
    with pytest.raises(ValueError, match="V1 model runner.*input batch.*VLLM_USE_V2_MODEL_RUNNER"):
        plugin.platform.select_v1_model_runner(sentencekv_config(plugin.member))


def test_explicit_v1_request_is_kept(plugin, monkeypatch):
    monkeypatch.setenv(V2_ENV, "0")
    plugin.platform.select_v1_model_runner(sentencekv_config(plugin.member))


@pytest.mark.parametrize("feature", ["hisparse_config", "watermark_config"])
def test_features_that_force_v2_are_refused(plugin, monkeypatch, feature):
    monkeypatch.delenv(V2_ENV, raising=False)
    with pytest.raises(ValueError, match="Model Runner V2"):
        plugin.platform.select_v1_model_runner(sentencekv_config(plugin.member, **{feature: object()}))


def test_vllm_config_answers_v1_for_sentencekv_even_where_triton_would_pick_v2(plugin, monkeypatch):
    """``VllmConfig.use_v2_model_runner`` is what the worker, scheduler and config code ask; with Triton (as on
    CUDA) and no env var it says V2 for a stock config, and V1 once the backend is SENTENCEKV."""
    import vllm.config.vllm as vllm_config_module
    from vllm.config import VllmConfig

    monkeypatch.delenv(V2_ENV, raising=False)
    cfg = VllmConfig()
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    assert cfg.use_v2_model_runner is True, "stock vLLM picks V2 when Triton imports"
    cfg.attention_config.backend = plugin.member
    assert cfg.use_v2_model_runner is False


def test_engine_config_end_to_end_picks_v1_only_for_sentencekv(plugin, monkeypatch):
    """Through vLLM's own ``EngineArgs.create_engine_config`` (the API server's path, our platform hook inside),
    with Triton importable as on CUDA: SENTENCEKV gets V1, its worker, and the variable its child processes
    inherit; a stock config still gets V2."""
    import os

    import vllm.config.vllm as vllm_config_module
    from vllm.engine.arg_utils import EngineArgs

    from sentencekv_vllm import fixtures

    monkeypatch.setenv(V2_ENV, "unset-below")     # so that monkeypatch restores "absent" afterwards
    monkeypatch.delenv(V2_ENV)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    model = str(fixtures.model_path())
    cfg = EngineArgs(model=model, attention_backend="sentencekv", max_model_len=2048).create_engine_config()
    assert cfg.use_v2_model_runner is False and os.environ[V2_ENV] == "0"
    assert cfg.parallel_config.worker_cls == plugin.platform.CPU_WORKER
    os.environ.pop(V2_ENV)
    stock = EngineArgs(model=model, max_model_len=2048).create_engine_config()
    assert stock.use_v2_model_runner is True


def test_worker_refuses_a_v2_runner(plugin):
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as RunnerV1

    v2 = object.__new__(RunnerV2)
    with pytest.raises(RuntimeError, match="V1 model runner.*VLLM_USE_V2_MODEL_RUNNER=0"):
        plugin.platform.ensure_v1_runner(v2)
    v1 = object.__new__(RunnerV1)
    v1.input_batch, v1.requests = object(), {}      # set in __init__ on the real runner
    plugin.platform.ensure_v1_runner(v1)


# -- item 3: CUDA graphs -----------------------------------------------------------------------------------------

def test_cuda_builder_declares_no_cudagraph_support():
    from vllm.v1.attention.backend import AttentionCGSupport

    from sentencekv_vllm.integration.cuda_backend import SentenceKVFlashBackend, SentenceKVFlashBuilder

    assert SentenceKVFlashBackend.get_builder_cls() is SentenceKVFlashBuilder
    assert SentenceKVFlashBuilder.get_cudagraph_support(None, None) is AttentionCGSupport.NEVER


def _compilation(mode_name: str):
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    comp = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode[mode_name])
    comp.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter", data_parallel_size=1)
    return comp


def test_vllm_resolves_default_mode_to_piecewise_for_the_builder():
    """What the V1 runner's ``_check_and_update_cudagraph_mode`` does with the builder's declaration."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    from sentencekv_vllm.integration.cuda_backend import SentenceKVFlashBuilder

    support = SentenceKVFlashBuilder.get_cudagraph_support(None, None)
    comp = _compilation("FULL_AND_PIECEWISE")
    assert comp.splitting_ops_contain_attention(), "attention is a graph split point by default"
    assert comp.resolve_cudagraph_mode_and_sizes(support, "SENTENCEKV") == CUDAGraphMode.PIECEWISE
    # FlashAttention's own declaration (FA3) would have kept full decode graphs: the bug this fixes
    stock = _compilation("FULL_AND_PIECEWISE")
    assert stock.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.ALWAYS, "FLASH_ATTN") == \
        CUDAGraphMode.FULL_AND_PIECEWISE
    with pytest.raises(ValueError, match="not supported"):
        _compilation("FULL").resolve_cudagraph_mode_and_sizes(support, "SENTENCEKV")


def _vllm_config_with(mode_name: str, fuse_attn_quant: bool = False):
    from vllm.config import CompilationConfig, CUDAGraphMode

    comp = CompilationConfig(cudagraph_mode=CUDAGraphMode[mode_name])
    comp.pass_config.fuse_attn_quant = fuse_attn_quant
    return SimpleNamespace(compilation_config=comp)


def test_platform_hook_downgrades_default_and_refuses_full(plugin):
    from vllm.config import CUDAGraphMode

    hook = plugin.platform.keep_attention_out_of_cuda_graphs
    cfg = _vllm_config_with("FULL_AND_PIECEWISE", fuse_attn_quant=True)
    hook(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cfg.compilation_config.pass_config.fuse_attn_quant is False
    hook(cfg)                                               # second run (EngineCore): no change
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    for mode in ("PIECEWISE", "NONE"):
        cfg = _vllm_config_with(mode)
        hook(cfg)
        assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode[mode]
    for mode in ("FULL", "FULL_DECODE_ONLY"):
        with pytest.raises(ValueError, match=f"cudagraph_mode={mode}.*PIECEWISE"):
            hook(_vllm_config_with(mode))


# -- item 8: FlashAttention's validate_configuration -------------------------------------------------------------

def _fake_cuda_platform(capability: tuple[int, int]) -> type:
    from vllm.platforms.interface import DeviceCapability, PlatformEnum

    class FakeCuda:
        _enum = PlatformEnum.CUDA

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(*capability)

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            return "stock"

    return FakeCuda


def _selector(head_size: int):
    import torch
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=head_size, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16)


def test_cuda_selection_runs_flash_attention_validation(plugin):
    platform_cls = _fake_cuda_platform((9, 0))
    plugin.platform._wrap_backend_selection(platform_cls)
    assert platform_cls.get_attn_backend_cls(plugin.member, _selector(128)) == plugin.registry.CUDA_BACKEND
    assert platform_cls.get_attn_backend_cls(None, _selector(128)) == "stock"
    with pytest.raises(ValueError, match="head_size not supported"):
        platform_cls.get_attn_backend_cls(plugin.member, _selector(100))


def test_cuda_selection_refuses_pre_ampere_gpus(plugin):
    platform_cls = _fake_cuda_platform((7, 5))
    plugin.platform._wrap_backend_selection(platform_cls)
    with pytest.raises(ValueError, match="compute capability not supported"):
        platform_cls.get_attn_backend_cls(plugin.member, _selector(128))


def test_cpu_selection_returns_the_cpu_backend(plugin):
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    assert plugin.platform.select_backend(type(current_platform), _selector(64)) == plugin.registry.CPU_BACKEND


# -- supported vLLM versions ---------------------------------------------------------------------------------------

def test_other_vllm_versions_get_a_warning(plugin):
    import vllm

    assert plugin.platform.version_warning() is None, f"the installed vLLM {vllm.__version__} is supported"
    assert plugin.platform.version_warning("0.32.3") is None
    warning = plugin.platform.version_warning("0.33.0")
    assert warning and "0.33.0" in warning and "0.32" in warning
