"""Issue #8: batch invariance in bf16 is no worse than stock attention's (float32 identity is in
tests/e2e/shared/test_serve.py). One bf16 server: the per-request ``full`` policy runs vLLM's own kernel over the
whole context (stock attention), the default policy runs SentenceKV; each batch is all one policy.

This server runs the torch path (``SENTENCEKV_NATIVE=0``; every other server runs the native CPU kernels) with
32-token blocks, so its budget (8 blocks) takes the paged path: the torch selection and fold end to end."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import prompts
from tests.e2e.servers import DETERMINISM, SKV, additional_config
from tests.server import vllm_server

pytestmark = pytest.mark.slow
ARGS = ("--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "4096", "--served-model-name", "smollm2",
        "--block-size", "32", *SKV, *additional_config(DETERMINISM))


ROUNDS = 3


def changed_in_batch(client: openai.OpenAI, batch: list[str], **xargs) -> int:
    def run(p: str) -> str:
        return client.completions.create(model="smollm2", prompt=p, max_tokens=24, temperature=0,
                                         extra_body={"vllm_xargs": xargs} if xargs else None).choices[0].text

    alone = [run(p) for p in batch]
    with ThreadPoolExecutor(len(batch)) as pool:
        together = list(pool.map(run, batch))
    return sum(a != b for a, b in zip(alone, together, strict=True))


def test_bf16_batch_changes_no_more_than_stock(model_path, tokenizer):
    batch = [prompts.chat(tokenizer, q) for q in prompts.SHORT_QUESTIONS]
    # sparse from 256 tokens on; kept short: bf16 prefill is emulated (slow) on AVX2-only CI machines
    batch += [prompts.long_prompt(tokenizer, n, off) for n, off in ((600, 60_000), (900, 330_000), (1200, 610_000))]
    with vllm_server(model_path, *ARGS, env={"SENTENCEKV_NATIVE": "0"}) as srv:
        assert "native CPU kernels off" in srv.log_text()
        client = openai.OpenAI(base_url=srv.v1, api_key="x", timeout=600)
        stock, skv = [], []
        for _ in range(ROUNDS):
            stock.append(changed_in_batch(client, batch, sentencekv_policy="full"))
            skv.append(changed_in_batch(client, batch))
    print(f"bf16 outputs changed inside a batch of {len(batch)}, per round: stock attention {stock}, sentencekv {skv}")
    # Which requests share a step differs from run to run, so one sample is noisy: the four short prompts (dense
    # with both policies, the same kernels) change in some rounds and not in others (measured per round: stock 3, 4,
    # 4 and sentencekv 3, 4, 3 changed outputs; one earlier single sample read 2 vs 4). The sparse path itself is
    # batch-invariant (float32 identity tests); here it may change at most one more output per round on average.
    assert sum(skv) <= sum(stock) + ROUNDS
