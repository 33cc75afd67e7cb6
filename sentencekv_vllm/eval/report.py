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


QUALITY_TITLES = {"niah": "Needle in a haystack", "ruler": "Synthetic tasks (older results: named RULER)",
                  "synthetic": "Synthetic tasks (multi-key needle, variable tracking, common words; RULER-inspired "
                               "generators of our own, not RULER's)",
                  "qa": "QA (who speaks a given line)"}


def _used(cfg: dict[str, Any], key: str, policies: list[str]) -> str:
    """The values of ``key`` the servers reported (/metrics) for these policies, else the requested value; a τ sent
    per request (``--budget`` against a running server) overrides the server's own."""
    if key == "budget" and cfg.get("base_url") and cfg.get("budget"):
        return str(cfg["budget"])
    servers = cfg.get("servers") or {}
    seen = sorted({str(v[key]) for p, v in servers.items() if p in policies and v.get(key) is not None})
    if seen:
        return " / ".join(seen)
    requested = cfg.get(key)
    return "vLLM default" if requested is None else str(requested)


def header(cfg: dict[str, Any]) -> list[str]:
    """Model by its id (and what the weights are), τ and block size as the servers reported them, versions."""
    model = f"`{cfg.get('model_id') or cfg['model']}`"
    if cfg.get("model_note"):
        model += f" ({cfg['model_note']}; served from `{cfg['model']}`)"
    sparse = [p for p in cfg.get("policies", []) if p != "full"]
    eager = {True: "eager", False: "compiled"}.get(cfg.get("enforce_eager", True), "eager")
    if cfg.get("base_url"):
        where = f"running server {cfg['base_url']}"
        full = (f"FULL = the server at {cfg['full_base_url']}" if cfg.get("full_base_url")
                else "FULL = the same server with `sentencekv_policy: full`")
        machine = f"harness side: vLLM {cfg['vllm']}, {cfg['cpu']}"
    else:
        where = f"max_model_len {cfg.get('max_model_len', 8192)}, {eager}, servers started by the run"
        full = "FULL = stock vLLM backend"
        machine = f"vLLM {cfg['vllm']}, torch {cfg['torch']} ({cfg['threads']} threads, {cfg['cpu']})"
    return ["# SentenceKV evaluation report", "",
            f"Model {model}, budget τ = {_used(cfg, 'budget', sparse)} tokens, dtype {cfg['dtype']}, block size "
            f"{_used(cfg, 'block_size', cfg.get('policies', []))}, {where}; {machine}, "
            f"{'quick' if cfg['quick'] else 'full'} mode, {cfg['date']}, wall {cfg.get('wall_s')} s.",
            f"{full}; {' / '.join(sparse) or 'the other policies'} = the SENTENCEKV backend at the same budget, "
            "selected per request (`vllm_xargs`; a policy with other units, such as quest, on its own server).", ""]


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    parts = results["parts"]
    out = header(cfg)
    for part in ("niah", "ruler", "synthetic", "qa"):
        if part in parts:
            out += [f"## {QUALITY_TITLES[part]}", "", quality_table(parts[part])]
            if parts[part].get("plot"):
                out += ["", f"![{part}]({parts[part]['plot']})"]
            fid = fidelity_table(parts[part])
            if fid:
                out += ["", "Greedy agreement with FULL (per task and context; says something even where the task "
                        "scores are 0 for every policy): tokens until the first differing token, its share of FULL's "
                        "output, share of steps whose top-1 token matches FULL's (`logprobs=1`), mean absolute "
                        "Δ logprob of the chosen tokens while they agree.", "", fid]
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
            fid = fidelity_table(parts[part])
            if fid and part == "lengths":
                out += ["Greedy agreement with FULL on the long outputs:", "", fid, ""]
    if "serve-bench" in parts:
        out += ["## Serving (batch × context)", "", serving_table(parts["serve-bench"]["per_policy"]), ""]
        pct = percentile_table(parts["serve-bench"]["per_policy"])
        if pct:
            out += ["Latency percentiles per point (ms; TTFT and TPOT per request, inter-token latency per streamed "
                    "token gap; Poisson = the arrival run of the CDF below):", "", pct, ""]
        out += ["Decode time split (seconds in the point, summed over layers and steps; exact on CPU): selection s = "
                "scoring sentences and filling the budget; sparse attn s = gathering the selected K/V and exact "
                "softmax; transfer s = host-tier copies; the rest of decode s (sum of per-request decode time) is "
                "the model and, for dense rows, the stock kernel. Older results have only the combined sparse s.", "",
                f"![latency CDF]({parts['serve-bench']['plot']})", ""]
        if parts["serve-bench"].get("step_plot"):
            out += [f"![step time vs context]({parts['serve-bench']['step_plot']})", ""]
    if "memory" in parts and not all("engine" in r for r in parts["memory"]["rows"]):
        out += ["## Device memory and concurrency", "", "(results.json from an older harness: re-run `memory`)", ""]
    elif "memory" in parts:
        out += ["## Device memory and concurrency (τ = %d, block size 128, offload: host)" % parts["memory"]["budget"],
                "",
                "Pool sized for two FULL requests of the prompt length; device blocks/req: median of vLLM's KV usage "
                "while one request decodes alone; max running: vLLM's running-requests gauge while all requests are "
                "sent at once; hot = `hot_set_factor`; running / TPOT: aggregate decode tokens/s estimated as "
                "issue #14 does (a request's TPOT includes the steps it shares with other prompts' prefill chunks); "
                "output tok/s: every streamed token over the batch's wall time, prefills included.", "",
                memory_table(parts["memory"]["rows"]), ""]
        if parts["memory"].get("plot"):
            out += [f"![memory and concurrency]({parts['memory']['plot']})", ""]
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


def fidelity_table(part: dict[str, Any]) -> str:
    """Policy × (task@context) rows of greedy agreement with FULL; empty when no policy has any."""
    rows = []
    for policy, v in part["summary"].items():
        for key, f in sorted((v.get("fidelity") or {}).items()):
            if "@" in key:
                task, ctx = key.split("@", 1)
                rows.append([policy, task, ctx, f["n"], f["prefix_tokens"], f["prefix_share"], f["top1_match"],
                             f["logprob_mae"]])
    if not rows:
        return ""
    return _table(["policy", "task", "ctx", "n", "tokens to 1st divergence", "share of FULL's output",
                   "top-1 match share", "mean abs Δ logprob (agreeing prefix)"], rows)


def percentile_table(per_policy: dict[str, Any]) -> str:
    """p50 / p90 / p99 of TTFT, TPOT and ITL per grid point and for the Poisson run; empty for older results."""
    rows = []
    for policy, b in per_policy.items():
        points = [(f"ctx {p['ctx']} × batch {p['batch']}", p) for p in b["grid"]]
        if b.get("poisson", {}).get("latencies"):
            points.append(("Poisson", b["poisson"]))
        for name, p in points:
            if "ttft_s_p50" not in p:
                continue
            rows.append([policy, name, *[p[f"{m}_p{q}"] * 1000 for m in ("ttft_s", "tpot_s", "itl_s")
                                         for q in (50, 90, 99)]])
    if not rows:
        return ""
    return _table(["policy", "point", *[f"{m} p{q}" for m in ("TTFT", "TPOT", "ITL") for q in (50, 90, 99)]], rows)


def serving_table(per_policy: dict[str, Any]) -> str:
    rows = []
    for policy, b in per_policy.items():
        for p in b["grid"]:
            rows.append([policy, p["ctx"], p["batch"], p["ttft_s"], p["tpot_s"] * 1000, p["throughput_tok_s"],
                         p["peak_running"], p["peak_kv_usage"] * 100, p["selection_s"], p.get("attention_s"),
                         p["transfer_s"], p["decode_s_sum"]])
    return _table(["policy", "ctx", "batch", "TTFT s", "TPOT ms", "tok/s", "peak running", "peak KV %",
                   "selection s", "sparse attn s", "transfer s", "decode s"], rows)


def memory_table(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "decode_rate": _decode_rate(r)} for r in rows]
    full = {r["ctx"]: r for r in rows if r["engine"] == "full"}
    table = []
    for r in rows:
        base = full.get(r["ctx"], {})

        def vs_full(key: str, r: dict = r, base: dict = base) -> float | None:
            return r[key] / base[key] if base.get(key) and r.get(key) is not None else None

        table.append([r["ctx"], r["engine"], r["blocks_per_request"], vs_full("blocks_per_request"),
                      r["pool_blocks"], r["requests"], r["peak_running"], vs_full("peak_running"),
                      r["tpot_s"] * 1000, r["decode_rate"], vs_full("decode_rate"),
                      r.get("throughput_tok_s"), vs_full("throughput_tok_s"),
                      r.get("selection_s"), r.get("attention_s"), r["transfer_s"],
                      r.get("hot_hit_rate"), r.get("host_token_share"), r.get("swap_in_blocks"), r["preemptions"]])
    return _table(["prompt tokens", "engine", "device blocks/req", "vs FULL", "pool blocks", "requests",
                   "max running", "concurrency x", "TPOT ms", "running / TPOT tok/s", "vs FULL", "output tok/s",
                   "vs FULL", "selection s", "sparse attn s", "transfer s",
                   "hot-set hit rate", "host-read token share", "swap-in blocks", "preemptions"], table)


def _decode_rate(row: dict[str, Any]) -> float | None:
    """Aggregate decode tokens/s as issue #14 estimates it: requests running at once over the mean TPOT. TPOT
    includes the steps a request shares with other requests' prefill chunks."""
    tpot = row.get("tpot_s")
    return row["peak_running"] / tpot if tpot and tpot == tpot and row.get("peak_running") else None
