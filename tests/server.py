"""Test access to the real-server launcher (shared with the eval harness)."""

from sentencekv_vllm.eval.launch import Server, free_port, run_serve_expecting_failure, stop, vllm_server  # noqa: F401


def metric(text: str, name: str) -> float:
    """Sum of every sample of series ``name`` (any labels) in a Prometheus text exposition."""
    import re

    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text,
                                                        re.M))
