"""Test access to the real-server launcher (shared with the eval harness)."""

from sentencekv_vllm.eval.launch import Server, free_port, run_serve_expecting_failure, stop, vllm_server  # noqa: F401
