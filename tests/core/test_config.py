import pytest

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
