"""Worker side of the host tier: the host copies, and the step's spills applied before the forward.

:class:`HostPool` holds one flat ``[slots, block_numel]`` tensor per layer, block for block in the device cache's own
layout, so a host block is read with the same offsets as a device block (``kv_layout.BlockLayout``). The connector
calls :func:`apply_spills` in ``handle_preemptions``, which vLLM runs before the forward: the copies land before any
freed block can be overwritten.

On CUDA the device->host copies run on a side stream into pinned staging buffers, one layer after the other; the
forward's stream waits for them on the device (an event), the Python thread does not. The staged blocks are
scattered into their host slots when the host pool is next read (:meth:`HostPool.layer`, :meth:`HostPool.load`) or
spilled to. On CPU host and device are the same RAM: the blocks are copied straight into their host slots (one
native pass over every layer's rows, ``native.RowCopier``; ``index_copy_`` per layer without it). A staging buffer
there was a second copy of every spilled byte and fresh memory to fault in whenever it grew.

Host slots are reused most recently freed first (``tier/scheduler.py``), so a served worker faults a slot's pages
in once, at its first spill; on CPU that first touch is most of a first spill's cost (measured in
``docs/eval/perf/README.md``, twelfth session); ``host_prefault: true`` moves it to start-up.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from sentencekv_vllm import native
from sentencekv_vllm.integration import metrics
from sentencekv_vllm.integration.compat import layer_index
from sentencekv_vllm.integration.kv_layout import flat_blocks
from sentencekv_vllm.integration.log import get_logger
from sentencekv_vllm.integration.tier.messages import Spill

logger = get_logger(__name__)


class HostPool:
    """Host copies of device blocks, one flat ``[slots, block_numel]`` tensor per layer (pinned on CUDA)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], capacity: int, prefault: bool = False) -> None:
        self.device_flat = []
        self.pool = []
        self.cuda = next(iter(kv_caches.values())).is_cuda
        for name in sorted(kv_caches, key=layer_index):     # pool[i] is layer i
            flat = flat_blocks(kv_caches[name])
            self.device_flat.append(flat)
            self.pool.append(torch.empty((capacity, flat.shape[1]), dtype=flat.dtype, pin_memory=self.cuda))
        self.bytes_out = 0
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._staging: list[torch.Tensor] = []
        self._pending: tuple[Any, torch.Tensor, int] | None = None     # (copies-done event, host slots, count)
        fits = native.usable(*self.pool) and native.RowCopier.fits(self.pool, self.device_flat)
        self._copier = native.RowCopier(self.pool, self.device_flat) if fits else None
        if prefault and not self.cuda:
            self._fault_in()

    def _fault_in(self) -> None:
        """``host_prefault``: touch every page of the pool now, so that no spill pays for first touches (a pinned
        CUDA pool is resident already)."""
        t0 = time.perf_counter()
        for p in self.pool:
            p.zero_()
        gib = sum(p.numel() * p.element_size() for p in self.pool) / 2**30
        logger.info("SentenceKV host tier: %.2f GiB faulted in at start-up in %.1f s", gib, time.perf_counter() - t0)

    def spill(self, spills: list[Spill]) -> None:
        """Copy device blocks to host slots, every layer, before this step's forward can reuse those blocks."""
        if not spills:
            return
        self._commit()
        n = len(spills)
        src = torch.tensor([s.block for s in spills], dtype=torch.long)
        dst = torch.tensor([s.slot for s in spills], dtype=torch.long)
        self.bytes_out += n * sum(p.shape[1] * p.element_size() for p in self.pool)
        if not self.cuda:
            self._copy_in_place(dst, src)
            return
        self._fit_staging(n)
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)              # the blocks' KV was written by earlier work on the main stream
        with torch.cuda.stream(self._stream):
            src_dev = src.to(self.device_flat[0].device, non_blocking=True)
            for dev, staged in zip(self.device_flat, self._staging, strict=True):
                staged[:n].copy_(dev.index_select(0, src_dev), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        main.wait_event(done)                       # the forward may overwrite the freed blocks only after this
        self._pending = (done, dst, n)

    def _copy_in_place(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """CPU: device blocks ``src`` straight into host slots ``dst``, every layer, before this step's forward."""
        if self._copier is not None:
            self._copier(dst, src)
            return
        for dev, host in zip(self.device_flat, self.pool, strict=True):
            host.index_copy_(0, dst, dev.index_select(0, src))

    def layer(self, layer: int) -> torch.Tensor:
        """Host copies of one layer, ``[slots, block_numel]``, with every spill so far in place."""
        self._commit()
        return self.pool[layer]

    def load(self, layer: int, entries: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor,
             head_offsets: torch.Tensor, contiguous: bool = False) -> int:
        """Hot-set swap-in of one layer: KV head ``heads[i]`` of host slot ``slots[i]`` into head-split entry
        ``entries[i]`` (``p * Hk + s``) of the device cache; ``head_offsets`` ``[Hk, n]`` where a head's K and V
        lie inside a block (``BlockLayout.head_offsets``); ``contiguous``: each head is one contiguous range, head
        after head (``BlockLayout.heads_contiguous``), so slices move as rows. Returns the bytes moved."""
        dev, host = self.device_flat[layer], self.layer(layer)
        hk = head_offsets.shape[0]
        if contiguous:
            rows = host.view(host.shape[0] * hk, -1).index_select(0, slots.cpu() * hk + heads.cpu())
            dev.view(dev.shape[0] * hk, -1).index_copy_(0, entries.to(dev.device), rows.to(dev.device,
                                                                                          non_blocking=True))
            return rows.numel() * rows.element_size()
        host_offs = head_offsets.cpu()
        src = slots.cpu()[:, None] * host.shape[1] + host_offs[heads.cpu()]
        data = host.view(-1)[src].to(dev.device, non_blocking=True)
        entries = entries.to(dev.device)
        dst = (entries // hk)[:, None] * dev.shape[1] + head_offsets.to(dev.device)[entries % hk]
        dev.view(-1)[dst] = data
        return data.numel() * data.element_size()

    def _commit(self) -> None:
        """Scatter the staged blocks of the last spill into their host slots (waits for its copies, once)."""
        if self._pending is None:
            return
        done, dst, n = self._pending
        self._pending = None
        done.synchronize()
        for host, staged in zip(self.pool, self._staging, strict=True):
            host[dst] = staged[:n]

    def _fit_staging(self, n: int) -> None:
        """Pinned staging rows for ``n`` blocks per layer (CUDA; grown, never shrunk)."""
        if self._staging and self._staging[0].shape[0] >= n:
            return
        rows = max(n, 2 * self._staging[0].shape[0] if self._staging else 16)
        self._staging = [torch.empty((rows, p.shape[1]), dtype=p.dtype, pin_memory=True) for p in self.pool]


def apply_spills(host: HostPool, spills: list[Spill], requests: dict[str, Any],
                 keep: Callable[[Any, int, int], None]) -> None:
    """Copy this step's spilled blocks to their host slots and tell each request (``RequestState.spilled``) which
    of its logical blocks now live where; ``keep(request, device block, logical block)``: a kept device block joins
    the request's hot set."""
    if not spills:
        return
    t0 = time.perf_counter()
    host.spill(spills)
    for spill in spills:
        req = requests.get(spill.req_id)
        if req is not None:
            req.spilled(spill.logical, spill.slot)
            if spill.kept:
                keep(req, spill.block, spill.logical)
    metrics.observe_transfer(time.perf_counter() - t0)
