"""Issue #8 (part): bad requests get vLLM's 400 naming the key, and the server stays healthy (shared server)."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = pytest.mark.slow


def _healthy(shared) -> bool:
    return requests.get(shared.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("xargs,fragment", [
    ({"sentencekv_budget": 10}, "sentencekv.budget"),
    ({"sentencekv_budget": 10**12}, "sentencekv.budget"),
    ({"sentencekv_budget": "many"}, "sentencekv.budget"),
    ({"sentencekv_policy": "h2o"}, "sentencekv.policy"),
    ({"sentencekv_policy": "quest"}, "sentencekv.policy"),
    ({"sentencekv_sinks": 4}, "sentencekv.sinks"),
    ({"sentencekv_trace": "yes please"}, "sentencekv.trace"),
])
def test_bad_per_request_override_is_400(shared, xargs, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        shared.complete("Hello", max_tokens=4, **xargs)
    assert fragment in str(err.value)
    assert _healthy(shared)


def test_empty_and_too_long_prompts_are_400(shared):
    with pytest.raises(openai.BadRequestError):
        shared.complete("", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        shared.complete("word " * 9000, max_tokens=4)
    assert _healthy(shared)
    assert shared.text("The capital of France is", max_tokens=4)
