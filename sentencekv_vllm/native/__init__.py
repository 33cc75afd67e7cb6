"""Native CPU kernels for the per-layer decode bookkeeping: paged block selection and the running-sum fold.

Why: a served CPU worker runs one OpenMP thread (vLLM keeps a core for the scheduler) and every layer's weights
evict the caches, so each torch op of the paged selection pays a dispatch and a cold read: measured in
``vllm serve`` at 1 x 7.5k (SmolLM2, float32), selection took ~180 us per layer (a dozen ops, each intermediate
written and read back) and the fold ~55 us, against ~170 us for the attention kernel itself. The work is one pass
over the rows' centroids: ``kernels.c`` does it in ~50 us (selection) and a few us (fold). ``torch.compile``
(inductor, CPU) measured slower than eager here (its call wrapper), so it is not used.

The C file is compiled on first use for this machine (``cc -O3 -march=native``, ``$CC`` if set), cached under
``$SENTENCEKV_CACHE/native`` (default ``~/.cache/sentencekv_vllm/native``) keyed by source, compiler and CPU flags,
and called through ``ctypes`` on the tensors' memory. It mirrors the torch reference (``core/blocks.py``,
``UnitStore.fold_open``): the same blocks in the same order, the same fold bit for bit; unit scores are float32
dot products summed in another order than torch's, so they may differ in the last bit (tests use exact integer
data). Without a C compiler, on other devices, or with ``SENTENCEKV_NATIVE=0``, the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sentencekv_vllm.core.blocks import BlockPlan

ENV = "SENTENCEKV_NATIVE"
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "skv_select_blocks": [_P, _I, _P, _I, _P, _P, _I, _P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P],
    "skv_fold": [_P, _I, _P, _I, ctypes.c_int, _P, _P, _I, _I, _I, _I, _P, _P, _I],
}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, build failed: logged once, the torch path runs)."""
    from sentencekv_vllm.integration.log import get_logger

    log = get_logger(__name__)
    if not enabled():
        log.info("SentenceKV: native CPU kernels off (%s=0); the torch path runs", ENV)
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        log.warning("SentenceKV: native CPU kernels unavailable (%s); the torch path runs (slower per layer)", exc)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    log.info("SentenceKV: native CPU kernels loaded from %s", path)
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), exe, version, " ".join(FLAGS), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SENTENCEKV_CACHE", Path.home() / ".cache" / "sentencekv_vllm")) / "native"
    path = cache / f"kernels-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:     # several workers may build at once: rename atomically
        out = Path(tmp) / path.name
        subprocess.run([exe, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True, check=True)
        os.replace(out, path)
    return path


def _cpu_flags() -> str:
    """-march=native code must not be reused on a CPU with other features (a cache shared between machines)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def usable(*tensors: torch.Tensor) -> bool:
    """The native kernels run on CPU tensors only, when the library is built."""
    return all(t.device.type == "cpu" for t in tensors) and library() is not None


class BlockSelector:
    """The paged selection of one sparse group for one step, every layer (``core/blocks.py``'s ``block_scores`` +
    ``select_blocks`` + ``physical_tables`` for the sentencekv policy): the step's fixed inputs as contiguous
    copies and the workspaces are made once; a call scores one layer's centroids with its query sums."""

    def __init__(self, plan: BlockPlan, unit_slots: torch.Tensor, slot: torch.Tensor,
                 tables: torch.Tensor | None, num_kv_heads: int) -> None:
        self.lib = library()
        self.r, self.s = unit_slots.shape
        self.hk, self.w, self.nb1 = num_kv_heads, plan.width, plan.base.shape[1]
        self.m = plan.cand.shape[1] // self.nb1
        self.cand = plan.cand.long().contiguous()
        self.num_blocks = plan.num_blocks.long().contiguous()
        self.unit_slots = unit_slots.long().contiguous()
        self.slot = slot.long().contiguous()
        self.tables = tables.int().contiguous() if tables is not None else None
        self.ext, self.score = torch.empty(num_kv_heads * (self.s + 3)), torch.empty(self.nb1)
        self.top = torch.empty(self.w, dtype=torch.long)

    def __call__(self, cent: torch.Tensor, qsum: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One layer: ``cent`` ``[P, Hk, D]`` and ``qsum`` ``[max_reqs, Hk, D]`` float32 (the store's rows),
        ``valid`` ``[R, S, Hk]`` bool. Returns the head-split block tables ``[R * Hk, W]`` int32, or the logical
        blocks ``[R, Hk, W]`` int64 when the selector has no tables (the host tier maps them itself)."""
        logical = self.tables is None
        out = torch.empty((self.r, self.hk, self.w) if logical else (self.r * self.hk, self.w),
                          dtype=torch.long if logical else torch.int32)
        self.lib.skv_select_blocks(
            cent.data_ptr(), cent.stride(0), qsum.data_ptr(), qsum.stride(0), self.slot.data_ptr(),
            self.unit_slots.data_ptr(), self.s, valid.contiguous().data_ptr(), self.cand.data_ptr(), self.nb1,
            self.m, self.num_blocks.data_ptr(), None if logical else self.tables.data_ptr(), self.r, self.hk,
            cent.shape[-1], self.w, self.ext.data_ptr(), self.score.data_ptr(), self.top.data_ptr(),
            out.data_ptr() if logical else None, None if logical else out.data_ptr())
        return out


def fold(query: torch.Tensor, key: torch.Tensor, tok: torch.Tensor, slot: torch.Tensor, qsum: torch.Tensor,
         key_sum: torch.Tensor | None) -> bool:
    """``UnitStore.fold_open`` for sum statistics, one layer: ``qsum[slot] +=`` each row's query summed over each
    KV head's query group, ``key_sum[slot] +=`` its key. query ``[T, Hq, D]`` / key ``[T, Hk, D]`` (rows may be
    strided views of the fused qkv output), tok / slot ``[R]``; qsum / key_sum ``[max_reqs, Hk, D]`` float32.
    Returns False (nothing done) when the layout or dtype is one the kernel does not take."""
    hk, d = qsum.shape[1], qsum.shape[2]
    dtype = DTYPES.get(query.dtype)
    if (dtype is None or key.dtype != query.dtype or query.stride(1) != d or query.stride(2) != 1
            or key.stride(1) != d or key.stride(2) != 1 or query.shape[1] % hk):
        return False
    tok, slot = tok.long().contiguous(), slot.long().contiguous()
    library().skv_fold(query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), dtype, tok.data_ptr(),
                       slot.data_ptr(), tok.numel(), hk, query.shape[1] // hk, d, qsum.data_ptr(),
                       key_sum.data_ptr() if key_sum is not None else None, qsum.stride(0))
    return True
