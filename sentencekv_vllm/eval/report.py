"""Markdown report from ``results.json``: config disclosure first, then one table per part."""

from __future__ import annotations

import statistics
from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    parts = results["parts"]
    out = ["# SentenceKV evaluation report", "",
           f"Model `{cfg['model']}`, budget τ = {cfg['budget']} tokens, dtype {cfg['dtype']}, block size "
           f"{cfg['block_size']}, vLLM {cfg['vllm']}, torch {cfg['torch']} ({cfg['threads']} threads, "
           f"{cfg['cpu']}), {'quick' if cfg['quick'] else 'full'} mode, {cfg['date']}, wall {cfg.get('wall_s')} s.",
           "FULL = stock vLLM backend; sentencekv / streaming / quest = the SENTENCEKV backend at the same budget.",
           ""]
    for part in ("niah", "ruler", "qa"):
        if part in parts:
            out += [f"## {part.upper() if part != 'niah' else 'Needle in a haystack'}", "", quality_table(parts[part])]
            if parts[part].get("plot"):
                out += ["", f"![{part}]({parts[part]['plot']})"]
            out.append("")
    if "ppl" in parts:
        rows = [[p, statistics.mean(r["ppl"] for r in v), sum(r["tokens"] for r in v)]
                for p, v in parts["ppl"]["per_policy"].items()]
        out += ["## Long-text perplexity (prompt logprobs)", "", _table(["policy", "mean PPL", "tokens"], rows), "",
                "Prompt logprobs come from vLLM's exact prefill, which SentenceKV does not approximate: equal values "
                "confirm the prefill is untouched; they say nothing about decode-time quality (see the tasks above).",
                ""]
    titles = (("lengths", "Output length vs FULL (greedy)"), ("lengths_t07", "Output length vs FULL (T=0.7)"))
    for part, title in titles:
        if part in parts:
            s = parts[part]["summary"]
            rows = [[p, v.get("length_ratio_median"), v.get("length_ratio_ge_1_5_share")]
                    for p, v in s.items() if p != "full"]
            out += [f"## {title}", "", _table(["policy", "median length ratio", "share ≥ 1.5x FULL"], rows), ""]
    if "serve-bench" in parts:
        out += ["## Serving (batch × context)", "", serving_table(parts["serve-bench"]["per_policy"]), ""]
        out += ["Sparse s: seconds in the SentenceKV sparse path (selection, K/V gather, exact softmax) in the point, "
                "summed over layers (the rest of decode is the model and the stock kernel); transfer s: host-tier "
                "copies; decode s: sum of per-request decode time.", "",
                f"![latency CDF]({parts['serve-bench']['plot']})", ""]
    if "memory" in parts:
        out += ["## Device memory and concurrency (τ = %d, offload: host)" % parts["memory"]["budget"], "",
                memory_table(parts["memory"]["rows"]), ""]
    return "\n".join(out) + "\n"


def quality_table(part: dict[str, Any]) -> str:
    summary = part["summary"]
    task_names = sorted({t for v in summary.values() for t in v["accuracy"]})
    rows = []
    for policy, v in summary.items():
        rows.append([policy, *[v["accuracy"].get(t) for t in task_names], v.get("accuracy_all"),
                     v.get("negative_share"), v.get("length_ratio_ge_1_5_share")])
    n = next(iter(summary.values()))["n"]
    header = ["policy", *[f"{t} (n={n.get(t)})" for t in task_names], "all", "negatives vs FULL",
              "outputs ≥1.5x FULL"]
    return _table(header, rows)


def serving_table(per_policy: dict[str, Any]) -> str:
    rows = []
    for policy, b in per_policy.items():
        for p in b["grid"]:
            rows.append([policy, p["ctx"], p["batch"], p["ttft_s"], p["tpot_s"] * 1000, p["throughput_tok_s"],
                         p["peak_running"], p["peak_kv_usage"] * 100, p["selection_s"], p["transfer_s"],
                         p["decode_s_sum"]])
    return _table(["policy", "ctx", "batch", "TTFT s", "TPOT ms", "tok/s", "peak running", "peak KV %",
                   "sparse s", "transfer s", "decode s"], rows)


def memory_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        full_blocks = r["full_blocks_per_request"]
        ratio = r["sentencekv_blocks_per_request"] / full_blocks if full_blocks else None
        conc = r["sentencekv_max_running"] / r["full_max_running"] if r["full_max_running"] else None
        table.append([r["ctx"], r["full_blocks_per_request"], r["sentencekv_blocks_per_request"], ratio,
                      r["pool_blocks"], r["requests"], r["full_max_running"], r["sentencekv_max_running"], conc,
                      r["full_tpot_s"] * 1000, r["sentencekv_tpot_s"] * 1000, r["sentencekv_transfer_s"],
                      r.get("full_preemptions"), r.get("sentencekv_preemptions")])
    return _table(["prompt tokens", "FULL blocks/req", "SKV blocks/req", "SKV/FULL", "pool blocks", "requests",
                   "FULL max running", "SKV max running", "concurrency x", "FULL TPOT ms", "SKV TPOT ms",
                   "SKV transfer s", "FULL preemptions", "SKV preemptions"], table)
