"""The server's API key on every ``/sentencekv/*`` route.

vLLM's ``AuthenticationMiddleware`` (``vllm/entrypoints/serve/middleware/authenticate.py``) guards only paths under
``/v1``, ``/v2``, ``/inference`` and ``/cohere``, so a plugin route is open unless it checks the key itself; the
inspector returns other clients' prompts and outputs, so it must. Same keys and the same comparison as vLLM: the
keys of ``--api-key`` (which wins) or else ``VLLM_API_KEY``; ``Authorization: Bearer <key>``, compared as SHA-256
digests with ``secrets.compare_digest`` -- by vLLM's own ``verify_token`` when it can be imported.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def server_keys(args: Any) -> list[str]:
    """vLLM's rule (``entrypoints/serve/middleware/register.py``): ``--api-key`` values, else ``VLLM_API_KEY``."""
    from vllm import envs

    cli = getattr(args, "api_key", None)
    if isinstance(cli, str):
        cli = [cli]
    return [key for key in (cli or [envs.VLLM_API_KEY]) if key]


def bearer_matches(key_digests: Sequence[bytes], headers: Mapping[str, str]) -> bool:
    """Copy of vLLM's ``AuthenticationMiddleware.verify_token`` (used only if that cannot be imported)."""
    value = headers.get("Authorization") or headers.get("authorization")
    if not value:
        return False
    scheme, _, param = value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(param.encode("utf-8")).digest()
    match = False
    for expected in key_digests:
        match |= secrets.compare_digest(digest, expected)
    return match


def _verifier(keys: list[str]) -> Callable[[Any], bool]:
    try:
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
    except ImportError:
        digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]
        return lambda headers: bearer_matches(digests, headers)
    return AuthenticationMiddleware(app=None, tokens=keys).verify_token  # type: ignore[arg-type]


class KeyCheck:
    """``allows(headers)``: True when the server has no key, or the request carries one of its keys."""

    def __init__(self, keys: list[str]) -> None:
        self.required = bool(keys)
        self._verify = _verifier(keys) if keys else None

    @classmethod
    def from_args(cls, args: Any) -> "KeyCheck":
        return cls(server_keys(args))

    def allows(self, headers: Any) -> bool:
        return self._verify is None or bool(self._verify(headers))
