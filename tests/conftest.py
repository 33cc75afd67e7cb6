"""Shared fixtures: the real test model's tokenizer and paths (built by scripts/setup.sh)."""

from __future__ import annotations

import functools

import pytest

from sentencekv_vllm import fixtures


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixtures.model_path()))


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(fixtures.model_path())


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()
