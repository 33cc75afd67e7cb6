"""configs/*.yaml are accepted by vLLM's own `vllm serve` argument parser and by the SentenceKV validator."""

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from sentencekv_vllm.plugin import register

    register()
    return make_arg_parser(FlexibleArgumentParser())


def test_there_are_cpu_32k_and_128k_configs():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-cpu.yaml", "llama-3.1-8b-32k.yaml", "llama-3.1-8b-128k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(parser, path):
    from vllm.config.attention import AttentionConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from sentencekv_vllm.config import SentenceKVConfig

    args = parser.parse_args(["--model", "placeholder", "--config", str(path)])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    backend = AttentionConfig.validate_backend_before(engine_args.attention_backend)
    assert backend.name == "SENTENCEKV"
    cfg = SentenceKVConfig.from_additional_config(engine_args.additional_config)
    assert cfg.budget < engine_args.max_model_len
    assert path.read_text().lstrip().startswith("#"), "each config explains its budget choice"
