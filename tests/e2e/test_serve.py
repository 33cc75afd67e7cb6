"""Issue #4: the SENTENCEKV backend behind the real ``vllm serve``, real SmolLM2, real OpenAI client.

Token-identity checks run in float32 (bf16 has near-ties and stock vLLM on CPU is not batch-invariant in bf16).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests import prompts
from tests.server import vllm_server

pytestmark = pytest.mark.slow

COMMON = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "8192", "--max-num-seqs", "16",
          "--served-model-name", "smollm2")
SKV = ("--attention-backend", "sentencekv", "--additional-config", '{"sentencekv": {"budget": 1024}}')
MAX_TOKENS = 24


def complete(client: openai.OpenAI, prompt: str, max_tokens: int = MAX_TOKENS, **xargs) -> str:
    extra = {"vllm_xargs": xargs} if xargs else None
    res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=extra)
    return res.choices[0].text


@pytest.fixture(scope="module")
def varied(tokenizer):
    return prompts.varied_prompts(tokenizer)


@pytest.fixture(scope="module")
def stock_outputs(model_path, varied):
    with vllm_server(model_path, *COMMON) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="x")
        return [complete(client, p) for p in varied]


@pytest.fixture(scope="module")
def skv(model_path, stock_outputs):   # stock server is gone before this one starts (2 cores)
    with vllm_server(model_path, *COMMON, *SKV, metrics=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(skv):
    return openai.OpenAI(base_url=skv.v1, api_key="x")


def test_backend_is_active(skv):
    log = skv.log_text()
    assert "SentenceKV enabled" in log
    assert "Cannot use SENTENCEKV backend" not in log


def test_completions_chat_and_streaming(client):
    text = complete(client, "The capital of France is", max_tokens=8)
    assert "Paris" in text
    chat = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=16,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=16, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and streamed == chat.choices[0].message.content


def test_budget_covering_context_matches_stock(client, varied, stock_outputs, tokenizer):
    lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in varied]
    assert min(lens) < 100 and sum(1 for n in lens if n > 5000) == 2 and sum(1 for n in lens if n > 1900) == 6
    got = [complete(client, p, sentencekv_budget=8192) for p in varied]
    assert got == stock_outputs


def _attended_buckets(text: str) -> dict[str, float]:
    found = {}
    for m in re.finditer(r'^sentencekv_attended_tokens_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
    return found


def test_small_budget_bounds_attended_tokens(skv, client, tokenizer):
    prompt = prompts.long_prompt(tokenizer, 4000, 200_000, task="Who is speaking in the last line above?")
    before = _attended_buckets(skv.metrics())
    text = complete(client, prompt, max_tokens=48, sentencekv_budget=256)
    after = _attended_buckets(skv.metrics())
    steps = after["+Inf"] - before.get("+Inf", 0)
    at_most_budget = after["256.0"] - before.get("256.0", 0)
    assert steps >= 40, "sparse decode steps were not recorded"
    assert at_most_budget == steps, "a sparse step attended more tokens than the budget"
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 5 and len(set(words)) >= 3, f"incoherent output: {text!r}"


def test_concurrent_mixed_lengths_equal_alone(client, tokenizer):
    batch = [prompts.chat(tokenizer, q) for q in prompts.SHORT_QUESTIONS[:3]]
    batch += [prompts.long_prompt(tokenizer, n, off) for n, off in
              ((1500, 20_000), (3000, 120_000), (3500, 520_000), (2500, 700_000), (2000, 900_000))]
    alone = [complete(client, p, sentencekv_budget=512) for p in batch]
    with ThreadPoolExecutor(len(batch)) as pool:
        together = list(pool.map(lambda p: complete(client, p, sentencekv_budget=512), batch))
    assert all(t for t in together)
    assert together == alone


def test_needle_found_by_sentencekv_missed_by_streaming(client, tokenizer):
    prompt = prompts.needle_prompt(tokenizer)
    skv_answer = complete(client, prompt, max_tokens=16, sentencekv_budget=512)
    stream_answer = complete(client, prompt, max_tokens=16, sentencekv_budget=512, sentencekv_policy="streaming")
    full_answer = complete(client, prompt, max_tokens=16, sentencekv_policy="full")
    assert "7291" in full_answer
    assert "7291" in skv_answer
    assert "7291" not in stream_answer


def test_prometheus_scrapes_sentencekv_series(skv, client, tokenizer):
    """Issue #7: a real Prometheus server scrapes vLLM's /metrics; the sentencekv series exist and move."""
    from tests.prometheus import prometheus_scraping

    with prometheus_scraping(skv.url) as prom:
        before = prom.wait_for("sum(sentencekv_sparse_decode_rows_total)", lambda v: v >= 0)
        budget = prom.wait_for("max(sentencekv_budget_tokens)", lambda v: v > 0)
        assert budget == 1024
        prom.wait_for("sum(vllm:num_requests_running)", lambda v: v >= 0)
        prompt = prompts.long_prompt(tokenizer, 3000, 50_000)
        complete(client, prompt, max_tokens=16, sentencekv_budget=512)
        after = prom.wait_for("sum(sentencekv_sparse_decode_rows_total)", lambda v: v >= before + 15)
        assert after - before >= 15
        assert prom.wait_for("sum(sentencekv_prompt_sentences_count)", lambda v: v > 0) > 0
