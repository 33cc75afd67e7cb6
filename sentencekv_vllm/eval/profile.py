"""``sentencekv-eval profile``: where a pure-decode step's time goes, stock vLLM vs SentenceKV, same machine.

Each variant runs in its own process with vLLM's engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the
model's forward runs under this process's ``torch.profiler``. ``batch`` distinct prompts of ``length`` tokens are
prefilled until every request has its first token; then ``warmup`` decode steps, ``steps`` steps timed one by one
(``LLMEngine.step``, no HTTP), and ``steps`` more under the profiler. Reported per variant: median step time, the
top operators by self CPU time per step, operator events per attention-layer call, and host syncs per layer call
(``aten::_local_scalar_dense``, what ``.item()`` / ``int(tensor)`` run: free on CPU, a device round trip each on a
GPU).

    sentencekv-eval profile --points 1x2000,4x4000 --dtype float32 --out docs/eval/perf/profile
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sentencekv_vllm.eval.perf import VARIANTS, prompts_for

SYNC_OPS = ("aten::_local_scalar_dense",)     # what .item() / int(tensor) / .tolist() of a scalar run
TOP_OPS = 15


def engine_kwargs(model: str, variant: str, budget: int, block_size: int, max_len: int, dtype: str) -> dict:
    kwargs = dict(model=model, dtype=dtype, block_size=block_size, max_model_len=max_len, max_num_seqs=16,
                  enforce_eager=True, seed=0)
    cfg = VARIANTS[variant]
    if cfg is not None:
        kwargs.update(attention_backend="sentencekv", additional_config={"sentencekv": {"budget": budget, **cfg}})
    return kwargs


def _step_until_first_tokens(engine: Any, ids: set[str]) -> None:
    """Step (prefill, possibly chunked) until every request has produced a token."""
    pending = set(ids)
    while pending:
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                pending.discard(out.request_id)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this process (called in a fresh subprocess by :func:`profile_points`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    llm = LLM(**engine_kwargs(spec["model"], spec["variant"], spec["budget"], spec["block_size"], spec["max_len"],
                              spec["dtype"]))
    engine = llm.llm_engine
    n_layers = engine.vllm_config.model_config.get_num_layers(engine.vllm_config.parallel_config)
    results = {}
    for batch, length in spec["points"]:
        key = f"{batch}x{length}"
        need = spec["warmup"] + 2 * spec["steps"] + 8
        params = SamplingParams(max_tokens=need, temperature=0, ignore_eos=True)
        ids = {f"{key}-{i}" for i in range(batch)}
        for rid, prompt in zip(sorted(ids), prompts_for(tokenizer, batch, length, salt=7), strict=True):
            engine.add_request(rid, prompt, params)
        _step_until_first_tokens(engine, ids)
        for _ in range(spec["warmup"]):
            engine.step()
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            engine.step()
            times.append(1e3 * (time.perf_counter() - t0))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                engine.step()
        results[key] = {"step_ms": statistics.median(times), "step_ms_all": times,
                        **_summarise(prof, spec["steps"], n_layers)}
        engine.abort_request(list(ids))
        while engine.has_unfinished_requests():
            engine.step()
        print(f"{spec['variant']:>10} {key}: step {results[key]['step_ms']:.1f} ms, "
              f"{results[key]['events_per_layer']:.0f} events / layer", flush=True)
    return results


def _summarise(prof: Any, steps: int, n_layers: int) -> dict[str, Any]:
    """Per-step self CPU time by operator (top ones), and per-layer event and sync counts."""
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    events = sum(e.count for e in averages)
    syncs = sum(e.count for e in averages if e.key in SYNC_OPS)
    return {
        "self_cpu_ms_per_step": total_self / 1e3 / steps,
        "events_per_step": events / steps,
        "events_per_layer": events / steps / n_layers,
        "syncs_per_layer": syncs / steps / n_layers,
        "top_ops": [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total
                     / 1e3 / steps, "share": e.self_cpu_time_total / max(1, total_self)} for e in top],
    }


def profile_points(model: str, variants: list[str], points: list[tuple[int, int]], budget: int, block_size: int,
                   dtype: str, steps: int, warmup: int) -> dict[str, Any]:
    """Every variant in a fresh process (one engine per process; only one runs at a time on a small machine)."""
    max_len = -(-(max(n for _, n in points) + warmup + 2 * steps + 300) // block_size) * block_size
    out = {}
    for variant in variants:
        spec = dict(model=model, variant=variant, points=points, budget=budget, block_size=block_size,
                    max_len=max_len, dtype=dtype, steps=steps, warmup=warmup)
        with tempfile.TemporaryDirectory(prefix="skv-profile-") as tmp:
            path = Path(tmp) / "result.json"
            code = ("import json, sys; from sentencekv_vllm.eval.profile import run_variant; "
                    "spec = json.loads(sys.argv[1]); json.dump(run_variant(spec), open(sys.argv[2], 'w'))")
            subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(path)], check=True)
            out[variant] = json.loads(path.read_text())
    return out


def table(results: dict[str, Any], points: list[tuple[int, int]]) -> str:
    lines = ["| requests × prompt | variant | step ms (median) | vs stock | self CPU ms / step | events / layer | "
             "host syncs / layer |", "|---|---|---|---|---|---|---|"]
    for batch, length in points:
        key = f"{batch}x{length}"
        stock = results.get("stock", {}).get(key)
        for variant, res in results.items():
            r = res[key]
            ratio = f"{r['step_ms'] / stock['step_ms']:.2f}x" if stock else ""
            lines.append(f"| {batch} × {length} | {variant} | {r['step_ms']:.1f} | {ratio} | "
                         f"{r['self_cpu_ms_per_step']:.1f} | {r['events_per_layer']:.0f} | "
                         f"{r['syncs_per_layer']:.2f} |")
    for batch, length in points:
        key = f"{batch}x{length}"
        for variant, res in results.items():
            lines += ["", f"Top operators by self CPU time, {variant}, {batch} × {length} (per decode step):", "",
                      "| operator | calls / step | self ms / step | share |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.2f} | {o['share']:.1%} |"
                      for o in res[key]["top_ops"]]
    return "\n".join(lines) + "\n"


def main(args: Any, model: str) -> int:
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = profile_points(model, variants, points, args.budget, args.block_size, args.dtype, args.steps,
                             args.warmup)
    meta = {"command": " ".join(["sentencekv-eval", "profile", *args.argv]), "budget": args.budget,
            "block_size": args.block_size, "dtype": args.dtype, "steps": args.steps,
            "wall_s": round(time.time() - t0, 1)}
    (out / "profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = table(results, points)
    (out / "profile.md").write_text(f"Command: `{meta['command']}`\n\n{md}")
    print(md)
    return 0
