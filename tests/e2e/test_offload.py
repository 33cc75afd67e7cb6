"""Issue #5: two-tier KV memory. Same tokens with and without offload; more concurrent decodes in a small
device pool than FULL; device and host usage back to idle afterwards. Real `vllm serve`, real model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import prompts
from tests.e2e import servers
from tests.e2e.servers import F32, SKV, additional_config
from tests.server import metric, vllm_server

pytestmark = pytest.mark.slow

ARGS = (*F32, "--max-model-len", "8192", "--max-num-seqs", "16", "--block-size", "32", *SKV)
EXACT = {"sentencekv_budget": 224}     # < 8 blocks of 32: the exact path; the server's 512 takes the paged one


# A short prompt whose decode turns sparse on the way (per-request budgets: 256 takes the paged path, 224 the
# exact one; sparse from budget + 1 with `dense_below: 1`). Without the host tier the row folds only from
# `max_sentence_len + 2` tokens before that and builds the sentences it generated before from the cache
# (planner.CatchUp); the host tier folds every token: identical tokens show the catch-up equals the fold. Run
# concurrently, their long sparse decodes share steps with the other rows: a row's decode path must not depend
# on its neighbours' budgets (it did: one 224-budget row sent every row of the step down the exact path).
CROSSING = [(300, {"sentencekv_budget": 256}), (300, {"sentencekv_budget": 224})]


def complete(client, prompt: str, max_tokens: int = 32, ignore_eos: bool = False, **xargs) -> str:
    body = {"vllm_xargs": xargs} if xargs else {}
    if ignore_eos:
        body["ignore_eos"] = True
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=body or None)
    return res.choices[0].text


@pytest.fixture(scope="module")
def identity_cases(tokenizer) -> list[tuple[str, int, dict]]:
    """(prompt, max_tokens, xargs): long prompts on both decode paths, and a decode crossing into sparse."""
    long = ([prompts.needle_prompt(tokenizer, 3000), prompts.long_prompt(tokenizer, 4000, 100_000)]
            + [prompts.long_prompt(tokenizer, n, off) for n, off in ((1000, 20_000), (1500, 450_000),
                                                                     (2000, 800_000))])
    short = prompts.chat(tokenizer, "Write a long story about a lighthouse keeper and a storm.")
    return [(p, 32, xargs) for p in long for xargs in ({}, EXACT)] + [(short, n, x) for n, x in CROSSING]


def run_case(client, case: tuple[str, int, dict]) -> str:
    prompt, max_tokens, xargs = case
    return complete(client, prompt, max_tokens, ignore_eos=max_tokens > 32, **xargs)


@pytest.fixture(scope="module")
def resident_outputs(model_path, identity_cases):
    with vllm_server(model_path, *ARGS, *additional_config(servers.OFFLOAD_BASE)) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        return [run_case(client, c) for c in identity_cases]


def test_offload_gives_identical_tokens_alone_and_concurrently(model_path, identity_cases, resident_outputs):
    with vllm_server(model_path, *ARGS, *additional_config(servers.OFFLOAD_HOST)) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        alone = [run_case(client, c) for c in identity_cases]
        with ThreadPoolExecutor(len(identity_cases)) as pool:
            together = list(pool.map(lambda c: run_case(client, c), identity_cases))
        text = srv.metrics()
    assert metric(text, "sentencekv_spilled_blocks_total") > 50, "nothing was offloaded"
    assert metric(text, "sentencekv_hot_set_hits_total") > 0, "the hot set never served a block"
    assert metric(text, "sentencekv_swap_in_blocks_total") > 0, "no block was swapped into a hot set"
    assert metric(text, "sentencekv_selected_host_tokens_total") > 0, "no token was read from the host tier"
    assert alone == resident_outputs
    assert together == resident_outputs


def test_full_host_tier_keeps_blocks_resident_with_identical_tokens(model_path, identity_cases, resident_outputs):
    """A host tier of fourteen 32-token fp32 blocks: the first spills take it, every other block stays on the
    device."""
    with vllm_server(model_path, *ARGS, *additional_config(servers.OFFLOAD_FULL_TIER)) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        with ThreadPoolExecutor(len(identity_cases)) as pool:
            together = list(pool.map(lambda c: run_case(client, c), identity_cases))
        time.sleep(2)
        text = srv.metrics()
    assert metric(text, "sentencekv_spilled_blocks_total") > 0
    assert metric(text, "sentencekv_host_tier_full_total") > 0, "the host tier never ran full"
    assert together == resident_outputs
    assert metric(text, "sentencekv_host_blocks") == 0


SMALL_POOL = (*F32, "--max-model-len", "4096", "--block-size", "128", "--num-gpu-blocks-override", "40",
              "--max-num-seqs", "16")


def max_running_during(srv, prompt_list: list[str], max_tokens: int, **xargs) -> tuple[float, list[str]]:
    client = openai.OpenAI(base_url=srv.v1, api_key="x", timeout=600)
    peak, done = 0.0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, metric(srv.metrics(), "vllm:num_requests_running"))
            time.sleep(0.3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(prompt_list)) as pool:
            outs = list(pool.map(lambda p: complete(client, p, max_tokens, **xargs), prompt_list))
    finally:
        done.set()
        sampler.join()
    return peak, outs


def test_small_pool_decodes_more_requests_concurrently(model_path, tokenizer):
    """40 blocks x 128 tokens; each prompt needs 24 blocks: FULL runs one at a time, SentenceKV keeps ~4 blocks
    per decoding request on the device (sinks, recent window, one hot-set block) and the rest on the host.
    One server: FULL is the per-request ``full`` policy, which keeps every block on the device as stock does."""
    batch = [prompts.long_prompt(tokenizer, 3000, 30_000 + 97_000 * i) for i in range(6)]
    with vllm_server(model_path, *SMALL_POOL, *SKV, *additional_config(servers.SMALL_POOL)) as skv:
        # FULL: two requests suffice to show they cannot run together (the rest would run one by one, ~1 min)
        full_peak, _ = max_running_during(skv, batch[:2], 16, sentencekv_policy="full")
        skv_peak, outs = max_running_during(skv, batch, 48)
        time.sleep(2)
        idle = skv.metrics()
    assert all(outs)
    assert full_peak <= 1
    assert skv_peak >= 4, f"SentenceKV peak running {skv_peak} vs FULL {full_peak}"
    assert metric(idle, "vllm:kv_cache_usage_perc") == 0
    assert metric(idle, "sentencekv_host_blocks") == 0
    assert metric(idle, "sentencekv_spilled_blocks_total") > 0
