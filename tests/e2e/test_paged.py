"""Issue #14: the paged decode path (``attention: paged``; ``auto`` picks it once the budget spans >= 8 blocks):
the best sentences' blocks read in place by the stock CPU kernel. Real ``vllm serve`` with 32-token blocks, real
SmolLM2, float32 so batch identity is exact."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests import prompts
from tests.server import metric, vllm_server

pytestmark = pytest.mark.slow

ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "8192", "--max-num-seqs", "16",
        "--block-size", "32", "--served-model-name", "smollm2", "--attention-backend", "sentencekv")


def complete(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **xargs) -> str:
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"vllm_xargs": xargs} if xargs else None)
    return res.choices[0].text


@pytest.fixture(scope="module")
def paged(model_path):
    cfg = {"sentencekv": {"budget": 512, "attention": "paged"}}
    with vllm_server(model_path, *ARGS, "--additional-config", json.dumps(cfg), metrics=True) as srv:
        yield srv, openai.OpenAI(base_url=srv.v1, api_key="x")


def _healthy(srv) -> None:
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200


def test_paged_needle_and_streaming(paged, tokenizer):
    srv, client = paged
    prompt = prompts.needle_prompt(tokenizer)
    assert "7291" in complete(client, prompt, max_tokens=16)
    assert "7291" not in complete(client, prompt, max_tokens=16, sentencekv_policy="streaming")
    _healthy(srv)


def test_paged_concurrent_equals_alone_and_stays_in_budget(paged, tokenizer):
    srv, client = paged
    batch = [prompts.long_prompt(tokenizer, n, off) for n, off in
             ((1500, 20_000), (3000, 120_000), (2500, 700_000), (900, 330_000))]
    batch.append(prompts.chat(tokenizer, prompts.SHORT_QUESTIONS[0]))
    alone = [complete(client, p) for p in batch]
    with ThreadPoolExecutor(len(batch)) as pool:
        together = list(pool.map(lambda p: complete(client, p), batch))
    assert together == alone
    text = srv.metrics()
    assert metric(text, "sentencekv_sparse_decode_rows_total") > 50
    buckets = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'^sentencekv_attended_tokens_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', text, re.M)}
    assert buckets["512.0"] == buckets["+Inf"], "a paged step attended more tokens than the budget"
    _healthy(srv)
