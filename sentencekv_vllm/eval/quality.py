"""Quality at a fixed budget: NIAH grid, synthetic retrieval/aggregation tasks, QA; per-sample negatives and output
lengths vs FULL; and greedy agreement with FULL (stock vLLM), which says something even on a model too small to
score on the tasks: tokens until the first divergence, share of steps whose top-1 token matches, and the mean
absolute difference of the chosen tokens' logprobs while the two still agree."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from sentencekv_vllm.eval import tasks
from sentencekv_vllm.eval.engines import Engine

NEGATIVE_THETA = 0.10   # a sample is a negative when its score drops by more than 10% vs FULL


def run_samples(engine: Engine, samples: list[dict], max_tokens: int, desc: str, concurrency: int = 4,
                temperature: float = 0.0) -> list[dict]:
    """Every sample through one engine; greedy runs also return token ids and logprobs (``logprobs=1``) so that
    each policy's output can be compared step by step with FULL's."""
    greedy = temperature == 0.0

    def one(item: tuple[int, dict]) -> dict:
        _, sample = item
        # no per-request seed: on vLLM 0.32 CPU a seeded request in a chunked-prefill step kills the engine
        # ("CPU Generator does not use offset", stock vLLM, see docs/STATUS.md)
        out = engine.complete(sample["prompt"], max_tokens, temperature=temperature, logprobs=1 if greedy else None)
        row = {"task": sample["task"], "meta": sample["meta"], "answers": sample["answers"], "output": out["text"],
               "tokens": out["tokens"], "score": tasks.score(sample, out["text"]) if sample["answers"] else None}
        if "token_ids" in out:
            row["token_ids"], row["logprobs"] = out["token_ids"], out["logprobs"]
        return row

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(one, enumerate(samples)), total=len(samples), desc=desc))


def agreement(full: dict, other: dict) -> dict[str, float] | None:
    """Greedy agreement of one sample with FULL's: ``prefix_tokens`` until the first differing token (and its share
    of FULL's length), ``top1_match`` = share of FULL's steps at which the policy's greedy (top-1) token is the same,
    ``logprob_mae`` = mean |Δ logprob| of the chosen tokens over the common prefix (0 when bit-identical).
    None when either side has no token ids (a server without logprobs)."""
    a, b = full.get("token_ids"), other.get("token_ids")
    if a is None or b is None:
        return None
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    matches = sum(x == y for x, y in zip(a, b, strict=False))
    lp_a, lp_b = full.get("logprobs") or [], other.get("logprobs") or []
    diffs = [abs(x - y) for x, y in zip(lp_a[:prefix], lp_b[:prefix], strict=False) if x is not None and y is not None]
    return {"prefix_tokens": prefix, "prefix_share": prefix / max(1, len(a)), "top1_match": matches / max(1, len(a)),
            "logprob_mae": round(statistics.mean(diffs), 6) if diffs else 0.0}


def fidelity(full: list[dict], rows: list[dict]) -> dict[str, Any]:
    """Greedy agreement with FULL averaged per task and per (task, context length), with n."""
    groups: dict[str, list[dict[str, float]]] = {}
    for f, r in zip(full, rows, strict=True):
        agree = agreement(f, r)
        if agree is None:
            continue
        r["agreement"] = agree
        for key in (r["task"], f"{r['task']}@{r['meta'].get('ctx')}"):
            groups.setdefault(key, []).append(agree)
    return {key: {"n": len(v), **{m: statistics.mean(a[m] for a in v) for m in v[0]}} for key, v in groups.items()}




def summarize(results: dict[str, list[dict]]) -> dict[str, Any]:
    """Accuracy per policy and task, per-sample negatives and output-length ratios vs FULL."""
    summary: dict[str, Any] = {}
    full = results.get("full")
    for policy, rows in results.items():
        by_task: dict[str, list[float]] = {}
        for r in rows:
            if r["score"] is not None:
                by_task.setdefault(r["task"], []).append(r["score"])
        entry: dict[str, Any] = {"accuracy": {t: statistics.mean(v) for t, v in by_task.items()},
                                 "n": {t: len(v) for t, v in by_task.items()}}
        scored = [r["score"] for r in rows if r["score"] is not None]
        entry["accuracy_all"] = statistics.mean(scored) if scored else None
        if full is not None and policy != "full":
            entry.update(compare_to_full(full, rows))
            entry["fidelity"] = fidelity(full, rows)
        summary[policy] = entry
    return summary


def compare_to_full(full: list[dict], rows: list[dict]) -> dict[str, Any]:
    pairs = list(zip(full, rows, strict=True))
    negatives = [f["score"] is not None and r["score"] < f["score"] * (1 - NEGATIVE_THETA) for f, r in pairs]
    scored = [f["score"] is not None for f, _ in pairs]
    ratios = [r["tokens"] / max(1, f["tokens"]) for f, r in pairs]
    return {"negative_share": sum(negatives) / max(1, sum(scored)),
            "length_ratio_median": statistics.median(ratios),
            "length_ratio_ge_1_5_share": sum(x >= 1.5 for x in ratios) / len(ratios)}


def niah_grid(tokenizer, contexts: list[int], depths: list[float], seeds: list[int]) -> list[dict]:
    return [tasks.niah(tokenizer, c, d, s) for c in contexts for d in depths for s in seeds]


def niah_heatmap(results: dict[str, list[dict]], path: str) -> None:
    """One panel per policy: accuracy by context length (x) and needle depth (y), with the value and the number of
    samples written in every cell; viridis, which stays readable in grey and for colour-blind readers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(results)
    fig, axes = plt.subplots(1, len(policies), figsize=(4 * len(policies), 3.6), squeeze=False)
    im = None
    for ax, policy in zip(axes[0], policies, strict=True):
        rows = [r for r in results[policy] if r["task"] == "niah"]
        ctxs = sorted({r["meta"]["ctx"] for r in rows})
        depths = sorted({r["meta"]["depth"] for r in rows})
        cells = [[[r["score"] for r in rows if r["meta"]["ctx"] == c and r["meta"]["depth"] == d] for c in ctxs]
                 for d in depths]
        grid = [[statistics.mean(cell) if cell else float("nan") for cell in line] for line in cells]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for y, line in enumerate(cells):
            for x, cell in enumerate(line):
                value = grid[y][x]
                ax.text(x, y, f"{value:.2f}\nn={len(cell)}" if cell else "n=0", ha="center", va="center",
                        fontsize=8, color="black" if value == value and value > 0.6 else "white")
        ax.set_xticks(range(len(ctxs)), [str(c) for c in ctxs])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context tokens")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
        ax.set_title(policy)
    fig.subplots_adjust(wspace=0.25)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (share of samples correct)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def prompt_perplexity(engine: Engine, texts: list[str], desc: str) -> list[dict]:
    """Perplexity of long public-domain texts from vLLM's prompt logprobs (``echo`` + ``logprobs``).

    Prompt logprobs come from the exact prefill, so every policy must match FULL here: this measures that
    SentenceKV leaves prefill untouched, not its decode-time approximation (see the report's note).
    """
    import math

    rows = []
    for text in tqdm(texts, desc=desc):
        res = engine.client.completions.create(model=engine.model, prompt=text, max_tokens=1, echo=True, logprobs=0,
                                               temperature=0, extra_body=engine.xargs())
        lps = [lp for lp in res.choices[0].logprobs.token_logprobs if lp is not None]
        rows.append({"tokens": len(lps), "ppl": math.exp(-sum(lps) / max(1, len(lps)))})
    return rows
