"""Retrieval inspector: routes on vLLM's own API server (``vllm.endpoint_plugins``) and a small web page."""
