"""Logging through vLLM's logger: only the ``vllm`` logger tree gets vLLM's handlers and format."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger(f"vllm.plugins.{name}")
