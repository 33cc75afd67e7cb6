"""Every ``vllm serve`` configuration the end-to-end suite starts, in one place.

Starting a server costs about a minute on the 2-core CI machine, so tests share servers: per-request options
(``vllm_xargs``) need no server of their own. :data:`SERVER_CONFIGS` lists each server's ``sentencekv`` section so
``tests/test_option_coverage.py`` can check that every documented option is turned on by at least one end-to-end
test (a suite that never turns an option on proves nothing about it).

float32 throughout, except where bf16 itself is under test: CI machines without native bf16 matmuls (AVX2-only)
run a bf16 prefill several times slower, and float32 makes batch identity exact.
"""

from __future__ import annotations

import json

MODEL_NAME = "smollm2"
F32 = ("--dtype", "float32", "--enforce-eager", "--served-model-name", MODEL_NAME)
SKV = ("--attention-backend", "sentencekv")


def additional_config(section: dict) -> tuple[str, str]:
    return "--additional-config", json.dumps({"sentencekv": section})


# The shared server (tests/e2e/shared/): 32-token blocks so `attention: auto` takes the paged path at the default
# budget (16 blocks) and the exact path for per-request budgets under 8 blocks (< 256 tokens), and traced rows.
# `dense_below: 1` (here and on the other sentence servers): sparse as soon as the context exceeds the budget, so
# the short CI prompts exercise selection; test_serve's dense-below test sends 2 per request.
SHARED = {"budget": 512, "trace_requests": 0, "dense_below": 1.0}
SHARED_ARGS = (*F32, "--max-model-len", "8192", "--max-num-seqs", "16", "--block-size", "32")

# Hostile conditions (tests/e2e/hostile/): spaCy, a tiny host tier that fills up, tiny device pool, an index
# that outgrows its reservation, priority scheduling, the trace ring written to disk, the inspector behind an API
# key, non-default segmentation knobs.
HOSTILE = {"budget": 256, "offload": "host", "host_pool_gib": 0.05, "hot_set_factor": 0.5, "segmentation": "spacy",
           "trace_requests": 64, "min_sentence_len": 3, "max_sentence_len": 96, "dense_below": 1.0,
           "index_tokens_per_unit": 64}    # reserved for too few sentences: the index grows past its reservation
# filled in by the fixtures: a temporary directory, and a spaCy pipeline saved to disk (blank "en" + sentencizer)
HOSTILE_PATHS = {"trace_dir": "<a temporary directory>", "spacy_model": "<a saved spaCy pipeline>"}

# Two-tier memory (tests/e2e/test_offload.py): the same selection with and without the host tier, on both decode
# paths (32-token blocks: the server's budget takes the paged path, a per-request 224 the exact one); non-default
# SnapKV knobs here, since both servers share them and the identity check covers them.
OFFLOAD_BASE = {"budget": 512, "semantic_factor": 1.5, "obs_window": 24, "pool_kernel": 5,
                "keep_unretained": False, "sinks": 16, "recent": 48, "dense_below": 1.0}
OFFLOAD_HOST = {**OFFLOAD_BASE, "offload": "host", "host_pool_gib": 2.0}
OFFLOAD_FULL_TIER = {**OFFLOAD_BASE, "offload": "host", "host_pool_gib": 0.02}
SMALL_POOL = {"budget": 512, "offload": "host", "hot_set_factor": 0.25, "dense_below": 1.0}   # host tier: auto size

# bf16 batch invariance (tests/e2e/test_determinism.py) asserts on outputs only: per-step statistics off there.
DETERMINISM = {"budget": 256, "stats": False, "dense_below": 1.0}

# Preemption with host blocks (tests/e2e/test_preemption.py); the paged path forced on a host-tier server;
# per-request traces refused; the host tier faulted in at start-up.
PREEMPTION = {"budget": 256, "offload": "host", "host_pool_gib": 0.5, "hot_set_factor": 0.5, "attention": "paged",
              "trace_per_request": False, "dense_below": 1.0, "host_prefault": True}

# The quest baseline is a server-level policy (its units are pages): the eval smoke test
# (tests/e2e/test_eval_smoke.py) starts a quest server and passes this section to every server it starts.
EVAL_EXTRA = {"quest_page_size": 32, "dense_below": 1.0}
EVAL_QUEST = {"policy": "quest", **EVAL_EXTRA}
# Grids small enough for CI: the eval tests check that every part runs and reports, not the numbers.
EVAL_SMALL_GRID = ("--quick", "--limit", "1", "--contexts", "600", "--depths", "0.5", "--task-contexts", "600",
                   "--bench-contexts", "600", "--batches", "2", "--poisson-requests", "2", "--poisson-rate", "4",
                   "--bench-tokens", "8", "--answer-tokens", "12", "--length-tokens", "12", "--ppl-tokens", "300")

SERVER_CONFIGS = {"shared": SHARED, "hostile": {**HOSTILE, **HOSTILE_PATHS}, "offload": OFFLOAD_HOST,
                  "offload-full-tier": OFFLOAD_FULL_TIER, "small-pool": SMALL_POOL, "preemption": PREEMPTION,
                  "determinism": DETERMINISM, "eval-quest": EVAL_QUEST}
