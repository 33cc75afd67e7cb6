"""Issue #8 (part): invalid configuration fails at start-up naming the key, before any engine process starts.
Each case is a real ``vllm serve`` (~20 s); the validator behind it is unit-tested key by key in
``tests/core/test_config.py``."""

from __future__ import annotations

import json

import pytest

from tests.server import run_serve_expecting_failure

pytestmark = pytest.mark.slow

BAD_CONFIGS = [
    ({"bugdet": 512}, "sentencekv.bugdet"),                              # unknown key
    ({"budget": 48, "sinks": 32, "recent": 32}, "sentencekv.budget"),    # a relation between keys
    ({"segmentation": "spacy", "spacy_model": "no_such_pipeline"}, "sentencekv.spacy_model"),   # not loadable
]


@pytest.mark.parametrize("section,key", BAD_CONFIGS, ids=[k + ":" + json.dumps(s) for s, k in BAD_CONFIGS])
def test_invalid_additional_config_fails_at_startup(model_path, section, key):
    code, out = run_serve_expecting_failure(model_path, "--attention-backend", "sentencekv", "--enforce-eager",
                                            "--additional-config", json.dumps({"sentencekv": section}))
    assert code != 0
    assert key in out, out[-3000:]
    assert "EngineCore" not in out, "must fail before any engine process starts"


def test_speculative_decoding_is_refused(model_path):
    code, out = run_serve_expecting_failure(
        model_path, "--attention-backend", "sentencekv", "--enforce-eager",
        "--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                            "prompt_lookup_max": 3}))
    assert code != 0
    assert "speculative decoding" in out, out[-3000:]
