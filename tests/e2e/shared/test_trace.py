"""Issue #17: a per-request trace (``vllm_xargs.sentencekv_trace``) on a server without a trace ring is kept in
the worker's memory, fetched over vLLM's RPC, served by the inspector, and never written to disk; requests that
did not ask are not traced."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow


def files_mentioning(root: Path, needle: str) -> list[Path]:
    """Files under ``root`` whose name or (first MB of) content mentions ``needle``."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file():
                with path.open("rb") as fh:
                    if needle in path.name or needle.encode() in fh.read(1 << 20):
                        found.append(path)
        except OSError:
            continue
    return found


def test_opt_in_trace_is_served_from_memory(shared, traced_needle):
    plain = shared.complete("The capital of France is", max_tokens=8)
    shared.text("Hello", max_tokens=2)                 # lets the worker retire it
    listing: dict = {}
    deadline = time.time() + 30
    while time.time() < deadline and not any(r.startswith(traced_needle.id) for r in listing.get("requests", [])):
        listing = requests.get(shared.url + "/sentencekv/requests", timeout=10).json()
        time.sleep(0.5)
    assert listing["tracing"] is False, "no server-wide ring"
    assert [r for r in listing["requests"] if r.startswith(traced_needle.id)], listing
    assert not [r for r in listing["requests"] if r.startswith(plain.id)], "only the opted-in request"
    doc = requests.get(shared.url + f"/sentencekv/requests/{traced_needle.id}", params={"top": 5}, timeout=10).json()
    assert doc["budget"] == 512 and doc["prompt_len"] > 4000 and doc["generated"]
    assert requests.get(shared.url + f"/sentencekv/requests/{plain.id}", timeout=10).status_code == 404
    old_default = [p for p in Path(tempfile.gettempdir()).glob("sentencekv-trace-*")
                   if p.stat().st_mtime >= shared.started]          # where traces went before #17
    written = files_mentioning(shared.tmp, traced_needle.id) + old_default
    assert not written, f"trace files on disk: {written}"
