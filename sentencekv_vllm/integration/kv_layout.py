"""Reading K/V of chosen tokens out of a backend's paged cache, whatever its block interior looks like.

CPU_ATTN stores K transposed inside a block for some ISAs and token-major for others; FlashAttention interleaves
K|V per token. Instead of hard-coding each layout, :meth:`BlockLayout.probe` asks the backend's own
``do_kv_cache_update`` to write coded keys/values into a one-block scratch cache and reads back where every
(token, head, dim) element landed. Codes are small integers (one base-16 digit per pass), exact in fp32/fp16/bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sentencekv_vllm import native

WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class BlockLayout:
    """Flat offsets inside one block (``cache.view(num_blocks, -1)[b]``) of K and V: ``[block, Hk, D]`` each."""

    k_off: torch.Tensor
    v_off: torch.Tensor
    block_size: int

    @classmethod
    def probe(cls, write: WriteFn, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int,
              head_dim: int) -> "BlockLayout":
        """``write(key, value, cache, slot_mapping)`` must store tokens like the backend does.

        The scratch block copies the real cache's per-block strides (CPU_ATTN is head-major, FlashAttention
        token-major behind the same logical shape), so offsets index the block's storage.
        """
        dtype, device = kv_cache.dtype, kv_cache.device
        per_block = block_numel(kv_cache)
        n = block_size * num_kv_heads * head_dim
        ids = torch.arange(n, device=device).view(block_size, num_kv_heads, head_dim)
        slots = torch.arange(block_size, device=device, dtype=torch.long)
        zeros = torch.zeros(block_size, num_kv_heads, head_dim, dtype=dtype, device=device)

        def locate(which: str) -> torch.Tensor:
            found = None
            for j in range(max(1, math.ceil(math.log(n, 16)))):
                code = ((ids >> (4 * j)) & 15).to(dtype) + 1
                storage = torch.zeros(per_block, dtype=dtype, device=device)
                cache = storage.as_strided((1, *kv_cache.shape[1:]), (per_block, *kv_cache.stride()[1:]))
                key, value = (code, zeros) if which == "k" else (zeros, code)
                write(key.contiguous(), value.contiguous(), cache, slots)
                flat = storage.float()
                pos = torch.nonzero(flat).flatten()
                if found is None:
                    found, digits = pos, torch.zeros_like(pos)
                if not torch.equal(pos, found) or pos.numel() != n:
                    raise RuntimeError(f"cannot probe the KV cache layout ({which}: {pos.numel()} of {n} written)")
                digits += (flat[pos].long() - 1) << (4 * j)
            off = torch.empty(n, dtype=torch.long, device=device)
            off[digits] = found
            return off.view(block_size, num_kv_heads, head_dim)

        return cls(locate("k"), locate("v"), block_size)

    def gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[R, Hk, W, D]`` of token ``positions[r, h, w]`` of each row, per KV head.

        block_table ``[R, max_blocks]`` (physical block of each logical block of the row).
        """
        r, hk, w = positions.shape
        flat = flat_blocks(kv_cache)
        blocks = block_table.long().gather(1, (positions // self.block_size).view(r, -1)).view(r, hk, w)
        return self.gather_blocks(flat, blocks, positions)

    def range_keys(self, kv_cache: torch.Tensor, block_row: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Keys ``[hi - lo, Hk, D]`` of one row's positions ``lo..hi-1`` (``block_row`` ``[max_blocks]``), read
        through the block's own offset table whatever its interior (AMX's packed keys too). On CPU one native pass
        over the keys alone; elsewhere the blocks holding them are copied whole and the keys picked (two gathers,
        instead of one per token and head)."""
        if native.usable(kv_cache):     # one pass over the keys alone
            keys = native.gather_keys(kv_cache, block_row, self.k_off, lo, hi)
            if keys is not None:
                return keys
        bs = self.block_size
        first, last = lo // bs, (hi - 1) // bs
        data = flat_blocks(kv_cache).index_select(0, block_row[first:last + 1].long())
        table = self.k_off.to(kv_cache.device)
        keys = data.index_select(1, table.reshape(-1)).view(-1, *table.shape[1:])
        return keys[lo - first * bs:hi - first * bs]

    def gather_entries(self, kv_cache: torch.Tensor, entries: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[R, Hk, W, D]`` of token ``positions[r, h, w]`` read from head-split entries ``[R, Hk, W]``
        (``p * Hk + s``: KV head ``s`` of device block ``p``, where a hot set may keep another head's slice)."""
        hk = positions.shape[1]
        return self.gather_tokens(flat_blocks(kv_cache), entries // hk, positions, entries % hk)

    def head_offsets(self, device: torch.device) -> torch.Tensor:
        """``[Hk, block * 2D]`` flat offsets inside a block of one KV head's K and V (a head slice)."""
        key = str(device)
        if key not in self._head_offsets:
            k = self.k_off.transpose(0, 1).reshape(self.k_off.shape[1], -1)
            v = self.v_off.transpose(0, 1).reshape(self.v_off.shape[1], -1)
            self._head_offsets[key] = torch.cat([k, v], dim=1).to(device)
        return self._head_offsets[key]

    @property
    def heads_contiguous(self) -> bool:
        """Each KV head's K and V fill one contiguous range of a block, head after head (CPU_ATTN's
        ``[Hk, block, 2D]``): a head slice is then one row of the block viewed as ``[Hk, block * 2D]``."""
        if self._heads_contiguous is None:
            offs = self.head_offsets(self.k_off.device).sort(dim=1).values
            n = offs.shape[1]
            expected = torch.arange(offs.numel(), device=offs.device).view(-1, n)
            self._heads_contiguous = bool(torch.equal(offs, expected))
        return self._heads_contiguous

    def gather_query_heads(self, kv_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                           num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[R, Hq, W, D]`` of token ``positions[r, h, w]`` per *query* head ``h`` (read from KV head
        ``h // (Hq / Hk)``: the query heads of one KV head are adjacent, so ``[R, Hq, W]`` is ``[R, Hk, G * W]``)."""
        r, hq, w = positions.shape
        k, v = self.gather(kv_cache, block_table, positions.reshape(r, num_kv_heads, -1))
        return k.view(r, hq, w, -1), v.view(r, hq, w, -1)

    def gather_blocks(self, flat: torch.Tensor, blocks: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same, from ``flat`` ``[num_blocks, block_numel]`` storage with explicit block ids ``[R, Hk, W]``.

        When the layout is affine in the head dim (offset = base(token, head) + d * stride, true for CPU_ATTN and
        FlashAttention), the storage is viewed as overlapping rows ``[base, base + stride, ...]`` and one row is
        picked per token (``index_select``, ~5x faster than an element-wise ``take``); otherwise one ``take``.
        """
        hk = positions.shape[1]
        return self.gather_tokens(flat, blocks, positions, torch.arange(hk, device=positions.device).view(1, hk, 1))

    def gather_tokens(self, flat: torch.Tensor, blocks: torch.Tensor, positions: torch.Tensor,
                      heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[*positions.shape, D]`` of KV head ``heads`` (broadcast against ``positions``) at token
        ``positions`` in block ids ``blocks`` of ``flat`` storage: any set of (token, head) pairs."""
        off = positions % self.block_size
        start = blocks * flat.shape[1]
        values = flat.reshape(-1)
        out = []
        for table, stride in ((self.k_off, self._k_stride), (self.v_off, self._v_stride)):
            table = table.to(positions.device)
            if stride is None:
                out.append(values.take(start[..., None] + table[off, heads]))
                continue
            base = start + table[:, :, 0][off, heads]
            d = table.shape[-1]
            rows = values.as_strided((values.numel() - (d - 1) * stride, d), (1, stride))
            out.append(rows.index_select(0, base.reshape(-1)).view(*base.shape, d))
        return out[0], out[1]

    def __post_init__(self) -> None:
        self._k_stride = _affine_stride(self.k_off)
        self._v_stride = _affine_stride(self.v_off)
        self._head_offsets: dict[str, torch.Tensor] = {}
        self._heads_contiguous: bool | None = None

def _affine_stride(table: torch.Tensor) -> int | None:
    """``s`` if ``table[t, h, d] == table[t, h, 0] + d * s`` everywhere, else None."""
    if table.shape[-1] < 2:
        return 1
    s = int(table[0, 0, 1] - table[0, 0, 0])
    expected = table[..., :1] + s * torch.arange(table.shape[-1], device=table.device)
    return s if torch.equal(table, expected) else None


def flat_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as ``[num_blocks, block_numel]`` (a view: one row per block, whatever its interior)."""
    return kv_cache.as_strided((kv_cache.shape[0], block_numel(kv_cache)), (kv_cache.stride(0), 1))


def block_numel(kv_cache: torch.Tensor) -> int:
    """Elements of one block; the cache must be block-major (true for every vLLM 0.32 per-layer layout)."""
    per_block = kv_cache[0].numel()
    if kv_cache.stride(0) != per_block:
        raise RuntimeError(f"SentenceKV needs a block-major KV cache, got strides {kv_cache.stride()}")
    return per_block
