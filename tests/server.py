"""Test access to the real-server launcher (shared with the eval harness)."""

from sentencekv_vllm.eval.launch import Server, free_port, run_serve_expecting_failure, stop, vllm_server  # noqa: F401


def metric(text: str, name: str) -> float:
    """Sum of every sample of series ``name`` (any labels) in a Prometheus text exposition, read with
    prometheus_client's parser (the format's escaping and HELP/TYPE rules are its job, not a regex's)."""
    from sentencekv_vllm.eval.serving import samples

    return sum(s.value for s in samples(text) if s.name == name and s.value == s.value)   # NaN: no sample
