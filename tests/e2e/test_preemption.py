"""Issue #8: preemption under a tiny device pool releases both memory tiers.

Priority scheduling makes the victim choice deterministic: long sparse requests (low priority) spill their middle
blocks to the host tier and decode; then dense requests (``sentencekv_policy: full`` per request, high priority)
grow until the pool runs out and vLLM preempts the lowest-priority running request -- a sparse one holding host
blocks. It is recomputed later (prompt + generated tokens in one dense prefill) and finishes. Afterwards the
device pool and the host tier are back to idle and every request produced its full output.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import prompts
from tests.e2e import servers
from tests.e2e.servers import F32, SKV, additional_config
from tests.server import metric, vllm_server

pytestmark = pytest.mark.slow

ARGS = (*F32, "--max-model-len", "1600", "--block-size", "32", "--num-gpu-blocks-override", "55",
        "--max-num-seqs", "12", "--max-num-batched-tokens", "512", "--scheduling-policy", "priority", *SKV,
        *additional_config(servers.PREEMPTION))
# the sparse requests must outlive the dense ones' first block growth (~8 decode steps after their prefill) by a
# wide margin: with 96 tokens they sometimes finished first on a slower machine and no victim held host blocks
SPARSE_TOKENS, DENSE_TOKENS = 256, 320


def generate(client: openai.OpenAI, prompt: str, max_tokens: int, priority: int, xargs: dict | None = None):
    body = {"priority": priority, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=body)
    return res.choices[0].finish_reason, res.usage.completion_tokens


def wait_until(srv, predicate, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = srv.metrics()
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError("condition not reached in time")


def test_preempted_sparse_requests_release_both_tiers_and_finish(model_path, tokenizer):
    sparse = [prompts.long_prompt(tokenizer, 900, 50_000 + 61_000 * i) for i in range(3)]
    dense = [prompts.long_prompt(tokenizer, 280, 700_000 + 13_000 * i) for i in range(5)]
    with vllm_server(model_path, *ARGS) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=600)
        with ThreadPoolExecutor(len(sparse) + len(dense)) as pool:
            low = [pool.submit(generate, client, p, SPARSE_TOKENS, 10) for p in sparse]
            # all three decoding with their middle blocks (~26 of 29 each) on the host
            wait_until(srv, lambda t: metric(t, "sentencekv_spilled_blocks_total") >= 66)
            high = [pool.submit(generate, client, p, DENSE_TOKENS, 0, {"sentencekv_policy": "full"}) for p in dense]
            results = [f.result() for f in low + high]
        wait_until(srv, lambda t: metric(t, "vllm:num_requests_running") == 0
                   and metric(t, "vllm:num_requests_waiting") == 0)
        time.sleep(2)
        idle = srv.metrics()
        health = client.with_options(timeout=10).models.list()
        log = srv.log_text()
        with pytest.raises(openai.BadRequestError, match="trace_per_request"):    # opt-in traces are off here
            generate(client, "Hello", 2, 0, {"sentencekv_trace": True})
    print(json.dumps({"preemptions": metric(idle, "vllm:num_preemptions_total"),
                      "preempted_host_releases": metric(idle, "sentencekv_preempted_host_releases_total"),
                      "spilled_blocks": metric(idle, "sentencekv_spilled_blocks_total")}))
    assert metric(idle, "vllm:num_preemptions_total") > 0, "the pool never forced a preemption"
    assert metric(idle, "sentencekv_preempted_host_releases_total") > 0, "no preempted request held host blocks"
    assert results == [("length", SPARSE_TOKENS)] * len(sparse) + [("length", DENSE_TOKENS)] * len(dense)
    assert metric(idle, "vllm:kv_cache_usage_perc") == 0, "device blocks leaked"
    assert metric(idle, "sentencekv_host_blocks") == 0, "host blocks leaked"
    assert health.data, "server unhealthy after preemption"
    assert "GiB faulted in at start-up" in log                    # host_prefault: the pool was touched at start-up

