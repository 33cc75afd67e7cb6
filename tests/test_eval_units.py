"""Unit tests of the eval harness's pure parts (no server): metrics parsing, percentiles, greedy agreement."""

from __future__ import annotations

import math

from sentencekv_vllm.eval import quality, serving
from sentencekv_vllm.eval.engines import Endpoint, Engine, EngineSpec, token_id
from tests.server import metric

EXPOSITION = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1.0
# HELP sentencekv_budget_tokens Server token budget
# TYPE sentencekv_budget_tokens gauge
sentencekv_budget_tokens 1024.0
# HELP vllm:num_preemptions_total Preemptions
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:num_preemptions_total{engine="1",model_name="m"} 3.0
# HELP vllm:kv_cache_usage_perc usage
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN
"""


def test_metric_sums_labelled_samples_and_skips_nan():
    assert metric(EXPOSITION, "vllm:num_preemptions_total") == 5.0
    assert metric(EXPOSITION, "vllm:kv_cache_usage_perc") == 0.0
    assert metric(EXPOSITION, "absent") == 0.0
    assert serving.sum_by_name(EXPOSITION)["vllm:num_preemptions_total"] == 5.0


def test_server_info_reads_the_values_in_use():
    class Fake:
        url, v1 = "http://x", "http://x/v1"

        def metrics(self) -> str:
            return EXPOSITION

    engine = Engine(Fake(), "sentencekv")
    assert serving.server_info(engine) == {"block_size": 16, "num_gpu_blocks": 4096, "budget": 1024}
    assert serving.num_device_blocks(engine) == 4096


def test_percentiles_match_numpy_linear():
    import numpy as np

    vals = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    got = serving.percentiles(vals, "x")
    for p in serving.PERCENTILES:
        assert math.isclose(got[f"x_p{p}"], float(np.percentile(vals, p)))
    assert math.isnan(serving.percentiles([], "x")["x_p50"])


def test_latency_stats_pool_inter_token_gaps():
    rows = [{"ttft_s": 1.0, "tpot_s": 0.1, "itl_s": [0.1, 0.1]}, {"ttft_s": 2.0, "tpot_s": 0.3, "itl_s": [0.3]}]
    stats = serving.latency_stats(rows)
    assert stats["ttft_s"] == 1.5 and math.isclose(stats["itl_s"], 0.5 / 3) and stats["itl_s_p99"] > 0.29


def test_greedy_agreement():
    full = {"token_ids": [1, 2, 3, 4, 5], "logprobs": [-0.1, -0.2, -0.3, -0.4, -0.5]}
    same = quality.agreement(full, dict(full))
    assert same == {"prefix_tokens": 5, "prefix_share": 1.0, "top1_match": 1.0, "logprob_mae": 0.0}
    other = {"token_ids": [1, 2, 9, 4], "logprobs": [-0.1, -0.3, -2.0, -0.4]}
    got = quality.agreement(full, other)
    assert got["prefix_tokens"] == 2 and got["prefix_share"] == 0.4 and got["top1_match"] == 0.6
    assert math.isclose(got["logprob_mae"], 0.05)
    assert quality.agreement({"text": "x"}, {"text": "y"}) is None


def test_engine_client_is_built_once_and_xargs_select_policy():
    engine = Engine(Endpoint("http://gpu-host:8000", "key", "meta-llama/Llama-3.1-8B-Instruct"), "streaming",
                    budget=1024, stock_full=False)
    assert engine.client is engine.client
    assert engine.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert engine.xargs() == {"vllm_xargs": {"sentencekv_policy": "streaming", "sentencekv_budget": 1024}}
    assert Engine(Endpoint("http://h"), "full", stock_full=False).xargs() == \
        {"vllm_xargs": {"sentencekv_policy": "full"}}
    assert Engine(Endpoint("http://h"), "full").xargs() is None
    assert token_id("token_id:42") == 42 and token_id("abc") == "abc"


def test_spec_compilation_and_server_args():
    spec = EngineSpec(model="m", max_model_len=32768, enforce_eager=False, extra_args=["--block-size", "16"],
                      skv_config={"offload": "host"})
    args = spec.server_args("sentencekv")
    assert "--enforce-eager" not in args and "32768" in args and "--block-size" in args
    assert '"offload": "host"' in args[-1]
    assert "--enforce-eager" in EngineSpec(model="m").server_args("full")
    remote = EngineSpec(model="x", base_url="http://a:8000", full_base_url="http://b:8000", served_model="s")
    assert remote.endpoint("full").url == "http://b:8000" and remote.endpoint("quest").url == "http://a:8000"


def test_perf_batch_job_helpers():
    """The batch-job figures of ``sentencekv-eval perf --pool-requests``: decode time is the union of the requests'
    decode spans (overlaps counted once), and the pool holds the asked stock requests but never less than one
    max_model_len request (vLLM's start-up check)."""
    from sentencekv_vllm.eval.perf import _union, pool_blocks

    assert _union([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert _union([(0.0, 10.0), (2.0, 3.0)]) == 10.0
    assert pool_blocks(0, 7756, 8000, 32) == 0
    assert pool_blocks(2, 7756, 8032, 32) == 2 * 245
    assert pool_blocks(1, 1000, 8000, 32) == 251


def test_perf_steady_rate_counts_the_requests_running_once_all_started():
    """Stock in a small pool: the first pair finished before the last started, so only the last pair counts."""
    from sentencekv_vllm.eval.perf import steady_rate

    first_pair = [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    last_pair = [[3.0, 4.0, 5.0, 6.0], [3.5, 4.5, 5.5]]
    assert steady_rate(first_pair + last_pair) == 4 / 2.0      # (3.5, 5.5]: 4.0 and 5.0, 4.5 and 5.5


def test_kernel_benchmark_times_stock_torch_and_native_selection():
    """``sentencekv-eval kernel`` at a tiny point: the stock kernel, the paged path with the torch selection and,
    where the native kernels are built, with the native one."""
    from sentencekv_vllm import native
    from sentencekv_vllm.eval import kernel

    res = kernel.measure([512], [2], [256], (9, 3), 64, 32, 2, 1.0, exact=False)
    row = res["rows"][0]
    assert row["stock_ms"] > 0 and row["paged_ms"] > 0
    assert ("native_ms" in row) == (native.library() is not None)
    assert "native" in kernel.table(res) or native.library() is None


def test_perf_table_reads_ttft_from_warm_repeats():
    """With several repeats a point's TTFT is the median of the repeats after a server's first (which pays its
    first long prefill); the run chosen for the step time may be a cold one."""
    from sentencekv_vllm.eval.perf import table

    def point(step, cold, warm):
        row = {"step_ms": step, "ttft_s": cold, "round_step_ms": [step]}
        return row if warm is None else {**row, "ttft_warm_s": warm}

    results = {v: {"points": {"1x7500": point(step, 8.2, warm)}} for v, step, warm in
               (("stock", 44.0, 4.3), ("sentencekv", 40.0, 4.5))}
    text = table(results, [(1, 7500)])
    assert "median of repeats after the first" in text and "| 4.30 / 4.50 |" in text
    for v in results:
        del results[v]["points"]["1x7500"]["ttft_warm_s"]
    text = table(results, [(1, 7500)])
    assert "median of repeats" not in text and "| 8.20 / 8.20 |" in text


def test_perf_tables_report_the_prefill_bound():
    """Batch job and ``vllm bench serve``: the last first token ends the prefill phase; floor / ceiling compare it
    with stock's whole wall time / duration (what the variant would reach if decoding after it were free)."""
    from sentencekv_vllm.eval.perf import bench_table, job_table, last_ttft

    def job(wall, firsts):
        return {"wall_s": wall, "output_tok_s": 1.0, "decode_tok_s": 1.0, "steady_tok_s": 1.0, "mean_tpot_ms": 1.0,
                "peak_running": 2, "ttft_s": 1.0, "step_ms": None,
                "chunk_times_s": [[f, f + 1.0] for f in firsts]}

    results = {"stock": {"points": {"8x7500": job(100.0, [5.0, 60.0])}},
               "host": {"points": {"8x7500": job(70.0, [5.0, 45.0])}}}
    assert last_ttft(results["host"]["points"]["8x7500"]) == 45.0
    text = job_table(results, [(8, 7500)])
    assert "| 45.0 | 0.45x |" in text and "| 60.0 | 0.60x |" in text
    bench = {"duration": 20.0, "output_throughput": 40.0, "last_ttft_s": 16.0}
    for v in results:
        results[v]["points"]["8x7500"]["vllm_bench"] = bench
    assert "| 16.0 | 1.25x |" in bench_table(results, [(8, 7500)])


def test_memory_table_reports_aggregate_decode_rate():
    """The memory benchmark's rows: aggregate decode tokens/s as issue #14 estimates it (running / TPOT) and the
    batch's output tokens/s, each against FULL at the same prompt length."""
    from sentencekv_vllm.eval.report import memory_table

    def row(engine, running, tpot_s, tok_s):
        return {"ctx": 7900, "engine": engine, "blocks_per_request": 10.0, "pool_blocks": 128, "requests": 10,
                "peak_running": running, "tpot_s": tpot_s, "throughput_tok_s": tok_s, "transfer_s": 0.0,
                "preemptions": 0.0}

    text = memory_table([row("full", 2, 0.5, 4.0), row("sentencekv hot=1", 8, 1.0, 6.0)])
    lines = text.splitlines()
    assert "running / TPOT tok/s" in lines[0]
    assert "| 500.00 | 4.00 | 1.00 | 4.00 | 1.00 |" in lines[2]
    assert "| 1000.00 | 8.00 | 2.00 | 6.00 | 1.50 |" in lines[3]
