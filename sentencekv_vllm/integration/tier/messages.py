"""What the host tier's two sides tell each other (scheduler -> worker, in the KV connector's step metadata)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Spill(NamedTuple):
    """Copy a request's device block to a host slot before the step's forward (the block may be reused after)."""

    req_id: str
    logical: int        # the request's logical block
    block: int          # device block id
    slot: int           # host slot
    kept: bool          # the device block stays allocated as a hot-set block


def host_block_bytes(kv_cache_config: Any) -> int:
    """Bytes one logical block takes across all layers (what a host slot must hold); both sides size the tier
    from it."""
    total = 0
    for group in kv_cache_config.kv_cache_groups:
        total += group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total
