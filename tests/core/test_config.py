import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sentencekv_vllm import config as config_module
from sentencekv_vllm.config import SentenceKVConfig, SentenceKVConfigError

BAD = [
    ({"budget": 0}, "budget"),
    ({"budget": -5}, "budget"),
    ({"budget": 64, "sinks": 32, "recent": 32}, "budget"),
    ({"budget": "512"}, "budget"),
    ({"budget": True}, "budget"),
    ({"sinks": -1}, "sinks"),
    ({"recent": 1.5}, "recent"),
    ({"semantic_factor": 0.5}, "semantic_factor"),
    ({"semantic_factor": "x"}, "semantic_factor"),
    ({"policy": "h2o"}, "policy"),
    ({"segmentation": "nltk"}, "segmentation"),
    ({"offload": "disk"}, "offload"),
    ({"min_sentence_len": 0}, "min_sentence_len"),
    ({"min_sentence_len": 50, "max_sentence_len": 10}, "min_sentence_len"),
    ({"max_sentence_len": 0}, "max_sentence_len"),
    ({"obs_window": 0}, "obs_window"),
    ({"pool_kernel": 4}, "pool_kernel"),
    ({"quest_page_size": 0}, "quest_page_size"),
    ({"keep_unretained": 1}, "keep_unretained"),
    ({"host_pool_gib": 0}, "host_pool_gib"),
    ({"hot_set_factor": -0.5}, "hot_set_factor"),
    ({"hot_set_factor": "big"}, "hot_set_factor"),
    ({"stats": "yes"}, "stats"),
    ({"spacy_model": 3}, "spacy_model"),
    ({"bugdet": 512}, "bugdet"),
]


@pytest.mark.parametrize("values,key", BAD)
def test_invalid_values_name_their_key(values, key):
    with pytest.raises(SentenceKVConfigError) as err:
        SentenceKVConfig.from_dict(values)
    assert err.value.key == key
    assert f"sentencekv.{key}" in str(err.value)


def test_defaults_and_derived():
    cfg = SentenceKVConfig()
    assert cfg.budget == 1024 and cfg.policy == "sentencekv"
    assert cfg.selection_budget == 1024 - 64
    assert cfg.semantic_budget == 2048


def test_additional_config_section():
    cfg = SentenceKVConfig.from_additional_config({"sentencekv": {"budget": 256, "policy": "quest"}, "other": 1})
    assert (cfg.budget, cfg.policy) == (256, "quest")
    assert SentenceKVConfig.from_additional_config(None) == SentenceKVConfig()
    with pytest.raises(SentenceKVConfigError):
        SentenceKVConfig.from_additional_config({"sentencekv": [1]})


def test_request_overrides():
    cfg = SentenceKVConfig(budget=512)
    assert cfg.with_request_overrides({"sentencekv_budget": 128, "unrelated": 1}).budget == 128
    assert cfg.with_request_overrides({"sentencekv_policy": "streaming"}).policy == "streaming"
    with pytest.raises(SentenceKVConfigError) as err:
        cfg.with_request_overrides({"sentencekv_budget": 10})
    assert err.value.key == "budget"
    with pytest.raises(SentenceKVConfigError) as err:
        cfg.with_request_overrides({"sentencekv_sinks": 4})
    assert err.value.key == "sinks"


# -- pydantic model (issue #17): strictness, immutability, generated documentation -------------------------------

ROOT = Path(__file__).parents[2]
TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"


@pytest.mark.parametrize("values,fragment", [
    ({"budget": True}, "sentencekv.budget: must be an integer, got True"),
    ({"budget": 50}, "sentencekv.budget: must exceed sinks + recent (32 + 32), got 50"),
    ({"policy": "h2o"},
     "sentencekv.policy: must be one of ['sentencekv', 'full', 'streaming', 'quest', 'snapkv', 'reference']"),
    ({"attention": "flash"}, "sentencekv.attention: must be one of ['auto', 'paged', 'exact']"),
    ({"trace_requests": True}, "sentencekv.trace_requests: must be an integer"),
    ({"trace_requests": 10_000}, "sentencekv.trace_requests: must be <= 256"),
    ({"trace_dir": ""}, "sentencekv.trace_dir"),
    ({"trace_per_request": "yes"}, "sentencekv.trace_per_request: must be true or false"),
    ({"bugdet": 512}, "sentencekv.bugdet: unknown key; valid keys are"),
])
def test_messages_name_the_key(values, fragment):
    with pytest.raises(SentenceKVConfigError) as err:
        SentenceKVConfig.from_dict(values)
    assert fragment in str(err.value)


def test_reference_policy_refuses_the_host_tier_per_server_and_per_request():
    """The reference policy reads the device cache only (``policies/reference.py``)."""
    with pytest.raises(SentenceKVConfigError, match="sentencekv.policy: 'reference' reads the device cache only"):
        SentenceKVConfig(policy="reference", offload="host")
    host = SentenceKVConfig(offload="host")
    with pytest.raises(SentenceKVConfigError, match="policy"):
        host.with_request_overrides({"sentencekv_policy": "reference"})
    assert SentenceKVConfig().with_request_overrides({"sentencekv_policy": "reference"}).policy == "reference"


def test_ints_accept_no_bools_and_floats_accept_ints():
    assert SentenceKVConfig(host_pool_gib=2).host_pool_gib == 2.0
    with pytest.raises(SentenceKVConfigError):
        SentenceKVConfig(host_pool_gib=True)
    with pytest.raises(SentenceKVConfigError):
        SentenceKVConfig(budget=512.0)


def test_frozen_hashable_and_validated_copies():
    cfg = SentenceKVConfig(budget=512, attention="exact")
    assert hash(cfg) == hash(SentenceKVConfig(budget=512, attention="exact")) and len({cfg, cfg.replace()}) == 1
    with pytest.raises(ValidationError):
        cfg.budget = 3
    assert cfg.replace(budget=256).budget == 256 and cfg.budget == 512
    with pytest.raises(SentenceKVConfigError) as err:
        cfg.replace(budget=8)
    assert err.value.key == "budget"
    assert SentenceKVConfig.from_dict(cfg.to_dict()) == cfg


def test_per_request_trace_flag():
    cfg = SentenceKVConfig()
    assert cfg.with_request_overrides({"sentencekv_trace": True}) == cfg     # a flag, not a hyper-parameter
    with pytest.raises(SentenceKVConfigError) as err:
        cfg.with_request_overrides({"sentencekv_trace": "yes"})
    assert err.value.key == "trace"
    assert cfg.with_request_overrides({"sentencekv_trace": 1}) == cfg      # vLLM's vllm_xargs turn true into 1
    with pytest.raises(SentenceKVConfigError):
        cfg.with_request_overrides({"sentencekv_trace": 2})
    with pytest.raises(SentenceKVConfigError) as err:
        SentenceKVConfig(trace_per_request=False).with_request_overrides({"sentencekv_trace": True})
    assert err.value.key == "trace"
    assert SentenceKVConfig(trace_per_request=False).with_request_overrides({"sentencekv_trace": False})


def test_readme_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    assert TABLE_START in readme and TABLE_END in readme, "README keeps the generated table between markers"
    body = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"
    assert body == config_module.markdown_table(), (
        "README table out of date: python -m sentencekv_vllm.config --markdown")


def test_schema_file_is_generated_and_accepts_the_configs():
    jsonschema = pytest.importorskip("jsonschema")
    committed = json.loads((ROOT / "docs" / "config.schema.json").read_text())
    assert committed == config_module.json_schema(), "python -m sentencekv_vllm.config --schema"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        section = yaml.safe_load(path.read_text()).get("additional-config", {}).get("sentencekv", {})
        jsonschema.validate(section, committed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"budget": "512"}, committed)


def test_cli_prints_both():
    out = subprocess.run([sys.executable, "-m", "sentencekv_vllm.config", "--markdown"], capture_output=True,
                         text=True, check=True).stdout
    assert out == config_module.markdown_table()
    out = subprocess.run([sys.executable, "-m", "sentencekv_vllm.config", "--schema"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == config_module.json_schema()
