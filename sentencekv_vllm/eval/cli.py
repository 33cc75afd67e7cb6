"""``sentencekv-eval``: quality and serving, FULL vs SentenceKV vs baselines, through the real engine.

    sentencekv-eval all --quick --out results/quick          # everything, small (< 5 min on 2 cores)
    sentencekv-eval niah --contexts 2000,4000 --budget 512   # one part
    sentencekv-eval report results/quick                     # re-render report.md from the JSON

Each run starts the servers it needs (stock vLLM for FULL; a SentenceKV server for ``sentencekv`` and
``streaming``; another for ``quest``; one with ``offload: host`` for the memory benchmark), one at a time, and writes
``results.json``, ``report.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from sentencekv_vllm.eval import quality, serving, tasks
from sentencekv_vllm.eval.engines import POLICIES, Engine, EngineSpec, engines_for
from sentencekv_vllm.eval.launch import vllm_server
from sentencekv_vllm.eval.report import render

PARTS = ("niah", "ruler", "qa", "ppl", "lengths", "serve-bench", "memory")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentencekv-eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("all", *PARTS):
        p = sub.add_parser(name)
        p.add_argument("--model", help="model path (default: the packaged test model)")
        p.add_argument("--out", default=f"results/{name}")
        p.add_argument("--quick", action="store_true", help="small grids; finishes in minutes on 2 cores")
        p.add_argument("--budget", type=int, default=None, help="token budget for every policy")
        p.add_argument("--policies", default=",".join(POLICIES))
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--contexts", type=_ints, default=None, help="context lengths (tokens)")
        p.add_argument("--depths", type=_floats, default=None)
        p.add_argument("--seeds", type=_ints, default=None)
        p.add_argument("--batches", type=_ints, default=None)
    rep = sub.add_parser("report")
    rep.add_argument("out")
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "budget": args.budget or (256 if quick else 512),
        "contexts": args.contexts or ([1200] if quick else [1000, 2500, 4000, 6000]),
        "depths": args.depths or ([0.3, 0.7] if quick else [0.1, 0.5, 0.9]),
        "seeds": args.seeds or ([0] if quick else [0, 1]),
        "ruler_contexts": [1200] if quick else [2000, 4000],
        "batches": args.batches or ([1, 4] if quick else [1, 4]),
        "bench_contexts": [1500] if quick else [2000, 4000],
        "bench_policies": ["full", "sentencekv"] if quick else list(POLICIES),
        "memory_contexts": [1000] if quick else [2000, 4000, 7900],
        "memory_requests": 3 if quick else 10,
        "memory_hot_factors": [1.0] if quick else [1.0, 0.25],
        "memory_budget": 256 if quick else 1024,     # the τ = 1024; quick: small enough to offload at 1k
        "poisson_requests": 2 if quick else 8,
        "poisson_rate": 0.5,
        "bench_tokens": 16 if quick else 64,
        "length_prompts": 1 if quick else 3,
        "length_tokens": 32 if quick else 160,
        "ppl_texts": 1 if quick else 2,
        "ppl_tokens": 1000 if quick else 6000,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        out = Path(args.out)
        (out / "report.md").write_text(render(json.loads((out / "results.json").read_text())))
        print(out / "report.md")
        return 0
    from transformers import AutoTokenizer

    from sentencekv_vllm import fixtures

    model = args.model or str(fixtures.model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = settings(args)
    parts = list(PARTS) if args.command == "all" else [args.command]
    policies = [p for p in args.policies.split(",") if p]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = EngineSpec(model=model, budget=cfg["budget"], dtype=args.dtype)
    results: dict[str, Any] = {"config": disclose(spec, cfg, parts, policies, args.quick), "parts": {}}
    t0 = time.time()
    run_quality_and_serving(spec, tokenizer, cfg, parts, policies, results, out)
    if "memory" in parts:
        results["parts"]["memory"] = memory_benchmark(spec, tokenizer, cfg)
    results["config"]["wall_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render(results))
    print(out / "report.md")
    return 0


def run_quality_and_serving(spec: EngineSpec, tokenizer, cfg: dict, parts: list[str], policies: list[str],
                            results: dict, out: Path) -> None:
    samples: dict[str, list[dict]] = {}
    if "niah" in parts:
        samples["niah"] = quality.niah_grid(tokenizer, cfg["contexts"], cfg["depths"], cfg["seeds"])
    if "ruler" in parts or "qa" in parts:
        both = tasks.ruler_and_qa(tokenizer, cfg["ruler_contexts"], cfg["seeds"])
        if "ruler" in parts:
            samples["ruler"] = [s for s in both if s["task"].startswith("ruler")]
        if "qa" in parts:
            samples["qa"] = [s for s in both if s["task"].startswith("qa")]
    if "lengths" in parts:
        samples["lengths"] = length_prompts(tokenizer, cfg["length_prompts"])
    outputs: dict[str, dict[str, list[dict]]] = {k: {} for k in samples}
    outputs["lengths_t07"] = {} if "lengths" in parts else outputs.get("lengths_t07", {})
    bench: dict[str, Any] = {}
    ppl: dict[str, list[dict]] = {}
    ppl_texts = perplexity_texts(tokenizer, cfg["ppl_texts"], cfg["ppl_tokens"]) if "ppl" in parts else []
    with engines_for(spec, policies) as engines:
        for engine in engines:
            if ppl_texts:
                ppl[engine.policy] = quality.prompt_perplexity(engine, ppl_texts, f"ppl/{engine.policy}")
            for part, items in samples.items():
                max_tokens = cfg["length_tokens"] if part == "lengths" else 24
                outputs[part][engine.policy] = quality.run_samples(engine, items, max_tokens,
                                                                   f"{part}/{engine.policy}")
                if part == "lengths":
                    outputs["lengths_t07"][engine.policy] = quality.run_samples(
                        engine, items, max_tokens, f"{part}@T0.7/{engine.policy}", temperature=0.7)
            if "serve-bench" in parts and engine.policy in cfg["bench_policies"]:
                bench[engine.policy] = serve_bench(engine, tokenizer, cfg)
    for part, per_policy in outputs.items():
        if per_policy:
            results["parts"][part] = {"summary": quality.summarize(per_policy), "samples": per_policy}
    if "niah" in outputs and outputs["niah"]:
        quality.niah_heatmap(outputs["niah"], str(out / "niah_heatmap.png"))
        results["parts"]["niah"]["plot"] = "niah_heatmap.png"
    if ppl:
        results["parts"]["ppl"] = {"per_policy": ppl}
    if bench:
        serving.latency_cdf_plot({p: b["poisson_latencies"] for p, b in bench.items() if b["poisson_latencies"]},
                                 str(out / "latency_cdf.png"))
        results["parts"]["serve-bench"] = {"per_policy": bench, "plot": "latency_cdf.png"}


def perplexity_texts(tokenizer, n: int, n_tokens: int) -> list[str]:
    """PG-19 stand-in: windows of the packaged public-domain plays, ``n_tokens`` each."""
    from sentencekv_vllm import fixtures

    out = []
    for i in range(n):
        text = fixtures.haystack_text(offset=150_000 + 211_000 * i, n_chars=n_tokens * 6)
        out.append(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]))
    return out


def length_prompts(tokenizer, n: int) -> list[dict]:
    import random

    from sentencekv_vllm.eval.tasks import _chat, _haystack

    rng = random.Random(11)
    return [{"task": "lengths", "prompt": _chat(tokenizer, _haystack(tokenizer, 2500, rng)
                                               + "\n\nRetell the scene above in your own words."),
             "answers": [], "meta": {"ctx": 2500}} for _ in range(n)]


def serve_bench(engine: Engine, tokenizer, cfg: dict) -> dict[str, Any]:
    import random

    from sentencekv_vllm.eval.tasks import _chat, _haystack

    rng = random.Random(5)
    grid = []
    for ctx in cfg["bench_contexts"]:
        for batch in cfg["batches"]:
            prompts = [_chat(tokenizer, _haystack(tokenizer, ctx, rng) + "\n\nSummarize.") for _ in range(batch)]
            point = serving.batch_point(engine, prompts, cfg["bench_tokens"])
            grid.append({"ctx": ctx, "batch": batch, **point})
            print(f"[serve-bench] {engine.policy} ctx={ctx} batch={batch}: ttft={point['ttft_s']:.2f}s "
                  f"tpot={point['tpot_s'] * 1000:.1f}ms", file=sys.stderr)
    latencies: list[float] = []
    if engine.policy in ("full", "sentencekv"):
        prompts = [_chat(tokenizer, _haystack(tokenizer, rng.choice(cfg["bench_contexts"]), rng) + "\n\nSummarize.")
                   for _ in range(cfg["poisson_requests"])]
        latencies = serving.poisson_load(engine, prompts, cfg["poisson_rate"], cfg["bench_tokens"])
    return {"grid": grid, "poisson_latencies": latencies}


def memory_benchmark(spec: EngineSpec, tokenizer, cfg: dict) -> dict[str, Any]:
    """Issue #5: device blocks per decoding request and max concurrency in a fixed pool (room for two FULL
    requests), FULL vs SentenceKV with the host tier at each hot-set size, τ = 1024 (quick: 256), plus TPOT with
    the decode time split into selection / sparse attention / host transfer."""
    import random

    from sentencekv_vllm.eval.tasks import _chat, _haystack

    rng = random.Random(9)
    budget = cfg["memory_budget"]
    rows = []
    engines = [("full", None)] + [(f"sentencekv hot={h:g}", h) for h in cfg["memory_hot_factors"]]
    for ctx in cfg["memory_contexts"]:
        # distinct prompts: identical ones would share blocks through FULL's prefix cache
        batch = [_chat(tokenizer, _haystack(tokenizer, ctx, rng) + "\n\nSummarize.")
                 for _ in range(cfg["memory_requests"])]
        max_len = ctx + 256
        # room for two FULL requests of this length (and one max_model_len request: vLLM's start-up check)
        pool_blocks = max(2 * (-(-(ctx + 128) // 128)) + 2, -(-max_len // 128))
        for name, hot in engines:
            extra = [] if hot is None else ["--attention-backend", "sentencekv", "--additional-config", json.dumps(
                {"sentencekv": {"budget": budget, "offload": "host", "host_pool_gib": 4.0, "hot_set_factor": hot}})]
            common = ["--dtype", spec.dtype, "--enforce-eager", "--max-model-len", str(max_len), "--block-size", "128",
                      "--served-model-name", "model", "--num-gpu-blocks-override", str(pool_blocks)]
            with vllm_server(spec.model, *common, *extra, metrics=True) as srv:
                engine = Engine(srv, "full" if hot is None else "sentencekv")
                row = {"ctx": ctx, "engine": name, "pool_blocks": pool_blocks, "requests": len(batch),
                       "blocks_per_request": serving.device_blocks_per_request(engine, batch[0], 48),
                       **serving.batch_point(engine, batch, 48)}
            rows.append(row)
            print(f"[memory] ctx={ctx} {name}: {row}", file=sys.stderr)
    return {"budget": budget, "rows": rows}


def disclose(spec: EngineSpec, cfg: dict, parts: list[str], policies: list[str], quick: bool) -> dict[str, Any]:
    import torch
    import vllm

    return {"model": spec.model, "budget": spec.budget, "dtype": spec.dtype, "block_size": 128,
            "policies": policies, "parts": parts, "quick": quick, "settings": cfg,
            "vllm": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    sys.exit(main())
