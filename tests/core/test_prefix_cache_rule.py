"""The prefix-caching rules (``integration/prefix_cache.py``) on plain request records; the engine hooks are
exercised end to end by ``tests/e2e/shared/test_serve.py`` (same prompt twice, a two-turn chat)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sentencekv_vllm.config import SentenceKVConfig
from sentencekv_vllm.integration.prefix_cache import PrefixCacheRule


class _Request:
    """The fields of vllm.v1.request.Request the rules read (a plain object: the rule keeps weak references)."""

    def __init__(self, num_tokens: int, num_prompt_tokens: int, extra_args: dict | None) -> None:
        self.num_tokens, self.num_prompt_tokens = num_tokens, num_prompt_tokens
        self.sampling_params = SimpleNamespace(extra_args=extra_args)


def _request(num_tokens: int, prompt: int | None = None, **xargs) -> _Request:
    return _Request(num_tokens, prompt or num_tokens, {f"sentencekv_{k}": v for k, v in xargs.items()} or None)


@pytest.mark.parametrize(("n", "expected"), [(2090, 2048), (2080, 2048), (2079, 2016), (40, 0), (10, 0)])
def test_hits_stop_before_the_observation_window(n, expected):
    rule = PrefixCacheRule(SentenceKVConfig(obs_window=32), block_size=32)
    assert rule.max_hit(_request(n)) == expected


def test_only_exactly_computed_tokens_are_cached():
    rule = PrefixCacheRule(SentenceKVConfig(budget=1024, dense_below=2.0), block_size=32)
    assert rule.max_cached(_request(3000, 2500)) == 2500                  # sparse from the first generated token
    assert rule.max_cached(_request(1500, 1000)) == 2047                  # still dense until context 2048
    assert rule.max_cached(_request(1500, 1000, budget=8192)) == 16383    # per-request budget
    assert rule.max_cached(_request(3000, 2500, policy="full")) is None   # dense policy: everything
    assert rule.max_cached(_request(300, 200, policy="reference")) == 200  # stateful: always sparse
