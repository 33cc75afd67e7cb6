"""Native CPU kernels for the per-layer decode bookkeeping: paged block selection and the running-sum fold; and
the host tier's spill (rows copied straight into the host slots) and hot-set resolution on CPU.

Why: every layer's weights evict the caches, so each torch op of the paged selection pays a dispatch and a cold
read: measured in ``vllm serve`` at 1 x 7.5k (SmolLM2, float32), selection took ~180 us per layer (a dozen ops,
each intermediate written and read back) and the fold ~55 us, against ~170 us for the attention kernel itself. The
work is one pass over the rows' centroids: ``kernels.c`` does it in ~50 us (selection) and a few us (fold), and a
layer's rows are found by pointer arithmetic, not by tensor views made per layer. With OpenMP (when the compiler
has it) the selection shares a batch's rows among torch's intra-op threads (the two a served worker on this
machine runs): at 8 x 7.5k (bf16, caches flushed), 262 us per layer on one thread, 118 us on two.
``torch.compile`` (inductor, CPU) measured slower than eager here (its call wrapper), so it is not used.

The C file is compiled on first use for this machine (``cc -O3 -march=native -fopenmp``, without OpenMP if that
fails; ``$CC`` if set), cached under
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
import logging
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
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fopenmp-simd")
OPENMP = ("-fopenmp",)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "skv_plan_blocks": [_P, _P, _P, _I, _I, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I],
    "skv_select_blocks": [_P, _I, ctypes.c_int, _P, _I, _P, _P, _I, _P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P, _P,
                          _P, _P, _P, _P, _I, _P, _P, _I, _I],
    "skv_openmp": [],
    "skv_gather_keys": [_P, _I, _P, _P, _I, _I, _I, _I, _I, _P, _I],
    "skv_centroids": [_P, _I, _I, _I, _P, _I, _P, _P, _P, _I],
    "skv_fold": [_P, _I, _P, _I, ctypes.c_int, _P, _P, _I, _I, _I, _I, _P, _P, _I],
    "skv_copy_rows": [_P, _P, _I, _P, _P, _I, _I],
    "skv_hot_resolve": [_P, _I, _P, _P, _I, _P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P,
                        _P, _P],
}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, build failed: logged once, the torch path runs)."""
    log = logging.getLogger(f"vllm.plugins.{__name__}")     # vLLM's handlers serve the ``vllm`` logger tree
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
    lib.skv_plan_blocks.restype = _I
    lib.skv_openmp.restype = ctypes.c_int
    log.info("SentenceKV: native CPU kernels loaded from %s", path)
    return lib


def _build() -> Path:
    """With OpenMP when the compiler has it (the selection then shares a batch's rows among torch's threads:
    ``libgomp.so.1`` resolves to the copy torch already loaded, so it is torch's own thread pool), else without."""
    compiler = os.environ.get("CC", "cc")
    exe = shutil.which(compiler)
    if exe is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    cache = Path(os.environ.get("SENTENCEKV_CACHE", Path.home() / ".cache" / "sentencekv_vllm")) / "native"
    cache.mkdir(parents=True, exist_ok=True)
    fixed = [SOURCE.read_text(), exe, version, platform.machine(), _cpu_flags()]
    error = ""
    for flags in (FLAGS + OPENMP, FLAGS):
        key = hashlib.sha256("\n".join([*fixed, " ".join(flags)]).encode()).hexdigest()[:16]
        path = cache / f"kernels-{key}.so"
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=cache) as tmp:     # several workers may build at once: rename atomically
            out = Path(tmp) / path.name
            done = subprocess.run([exe, *flags, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(out, path)
                return path
        error = f"{compiler} {' '.join(flags)} failed: {done.stderr.strip()[-400:]}"
    raise RuntimeError(error)


def threads() -> int:
    """Threads the native selection may use: torch's intra-op threads when the kernels have OpenMP."""
    lib = library()
    return torch.get_num_threads() if lib is not None and lib.skv_openmp() else 1


def _cpu_flags() -> str:
    """-march=native code must not be reused on a CPU with other features (a cache shared between machines)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def usable(*tensors: torch.Tensor) -> bool:
    """The native kernels run on CPU tensors only, when the library is built."""
    return all(t.device.type == "cpu" for t in tensors) and library() is not None


def _layer_ptrs(t: torch.Tensor) -> list[int]:
    """The address of each ``t[i]`` (made once per step: a view per layer costs more than the kernel)."""
    base, step = t.data_ptr(), t.stride(0) * t.element_size()
    return [base + i * step for i in range(t.shape[0])]


def plan_blocks(starts: torch.Tensor, ends: torch.Tensor, unit_valid: torch.Tensor, seq_lens: torch.Tensor,
                budget: torch.Tensor, sinks: int, tail_start: torch.Tensor, block_size: int) -> BlockPlan:
    """``core.blocks.plan_blocks`` in one native call, the same plan (CPU tensors). The per-step plan is ~40 small
    torch ops there (~1 ms a step at batch 1 in the served worker); here it is one pass over the rows' units."""
    r, s = starts.shape
    seq = seq_lens.long().contiguous()
    nb1 = -(-int(seq.max()) // block_size) + 1
    base = torch.empty(r, nb1)
    fixed = torch.empty(r, nb1, dtype=torch.bool)
    k, out_seq = torch.empty(r, dtype=torch.long), torch.empty(r, dtype=torch.long)
    counts = torch.empty(r * nb1, dtype=torch.long)
    inputs = (starts.long().contiguous(), ends.long().contiguous(), unit_valid.contiguous(), seq,
              budget.long().contiguous(), tail_start.long().contiguous())
    m, cand = 0, torch.empty(0, dtype=torch.long)
    for room in (4, None):      # most blocks overlap a few units; otherwise retry with the exact width
        cand = torch.empty(r * nb1 * (room or m), dtype=torch.long)
        m = library().skv_plan_blocks(*(t.data_ptr() for t in inputs[:3]), r, s,
                                      *(t.data_ptr() for t in inputs[3:]), sinks, block_size, nb1, base.data_ptr(),
                                      fixed.data_ptr(), k.data_ptr(), out_seq.data_ptr(), counts.data_ptr(),
                                      cand.data_ptr(), cand.numel())
        if r * nb1 * m <= cand.numel():
            break
    kmax = int(k.max())
    drop = (torch.arange(kmax)[None, :] >= k[:, None])[:, None, :] if bool((k < kmax).any()) else None
    tie = (1 << 31) - 1 - torch.arange(nb1)
    return BlockPlan(base, fixed, drop, k, out_seq, cand[:r * nb1 * m].view(r, nb1 * m), tie)


def gather_keys(kv_cache: torch.Tensor, block_row: torch.Tensor, k_off: torch.Tensor, lo: int,
                hi: int) -> torch.Tensor | None:
    """``BlockLayout.range_keys`` in one pass: keys ``[hi - lo, Hk, D]`` (the cache's dtype) of one request's
    positions ``lo..hi-1`` through its ``block_row`` ``[max_blocks]`` and the probed key offsets ``k_off``
    ``[block, Hk, D]``. None when the cache's elements are not 2 or 4 bytes (the caller reads them in torch).
    The torch path copies every block whole (values too) and then picks the keys: ~1.7 ms a layer at 4k tokens."""
    esize = kv_cache.element_size()
    if esize not in (2, 4) or hi <= lo:
        return None
    bs = k_off.shape[0]
    off = k_off.long().contiguous()
    row = block_row[:(hi - 1) // bs + 1].long().contiguous()
    out = torch.empty(hi - lo, *k_off.shape[1:], dtype=kv_cache.dtype)
    library().skv_gather_keys(kv_cache.data_ptr(), kv_cache.stride(0) * esize, row.data_ptr(), off.data_ptr(), bs,
                              off[0].numel(), esize, lo, hi, out.data_ptr(), threads())
    return out


def sentence_centroids(keys: torch.Tensor, spans: torch.Tensor, retained: torch.Tensor | None = None,
                       keep_unretained: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``core.index.sentence_centroids`` in one pass, the same arguments and the same bits (sums in token order
    from zero, as its ``index_add_``): keys ``[T, Hk, D]`` on CPU, spans ``[S, 2]`` covering ``[0, T)``. The torch
    path's two ``index_add_`` and masks cost ~0.8 ms a layer at 4k tokens."""
    t, hk, d = keys.shape
    keys = keys.float().contiguous()
    spans = spans.long().contiguous()
    ret = None if retained is None else retained.contiguous()
    cent = torch.empty(len(spans), hk, d)
    has = torch.empty(len(spans), hk, dtype=torch.bool)
    library().skv_centroids(keys.data_ptr(), t, hk, d, spans.data_ptr(), len(spans),
                            None if ret is None else ret.data_ptr(), cent.data_ptr(), has.data_ptr(), threads())
    return cent, (torch.ones_like(has) if keep_unretained or retained is None else has)


class BlockSelector:
    """The paged selection of one sparse group for one step, every layer (``core/blocks.py``'s ``block_scores`` +
    ``select_blocks`` + ``physical_tables`` for the sentencekv policy): the step's fixed inputs, workspaces, output
    buffer, call arguments and every layer's pointers are made once; a call scores one layer's centroids with its
    query sums.

    Why the pointers: a served layer's forward runs after the layer's weights went through the caches, and there
    each tensor made in Python (``pool[layer]``: a view) costs microseconds; three per layer were more than the
    kernel's own time at batch 1. A layer's rows are found by arithmetic on the step's base pointers instead.

    The call also copies the rows' query into :attr:`query`, the head-split kernel's query ``[R * Hk, Hq / Hk, D]``
    made once per step (several rows' heads are not one strided view of the fused qkv; a copy in torch made two
    tensors per layer). The output buffers are shared by the step's layers: each layer's attention reads its
    tables and query before the next layer selects (CPU ops are synchronous; the native path runs on CPU only)."""

    def __init__(self, plan: BlockPlan, unit_slots: torch.Tensor, slot: torch.Tensor,
                 tables: torch.Tensor | None, num_kv_heads: int, cent: torch.Tensor, qsum: torch.Tensor,
                 valid: torch.Tensor, tok: torch.Tensor | None = None) -> None:
        """``cent`` ``[L, P, Hk, D]`` the unit pool (float32, bfloat16 or float16), ``qsum`` ``[L, max_reqs, Hk, D]``
        float32 the open query sums, ``valid`` ``[L, P, Hk]`` bool whether each head may take each pool unit (the
        store's tensors, each layer contiguous; read through ``unit_slots``, no per-step gather); ``tok`` ``[R]``
        the rows' token indices in the layer's query (None: no query copy)."""
        r, s = unit_slots.shape
        hk, w, nb1 = num_kv_heads, plan.width, plan.base.shape[1]
        logical = tables is None
        if cent.dim() != 4 or not all(t[0].is_contiguous() for t in (cent, qsum, valid)):
            raise ValueError("BlockSelector needs [L, P, Hk, D] / [L, P, Hk] pools with contiguous layers")
        nt = min(threads(), r)     # one workspace per thread
        # kept alive for the pointers below
        self._inputs = (plan.cand.long().contiguous(), plan.num_blocks.long().contiguous(),
                        unit_slots.long().contiguous(), slot.long().contiguous(),
                        None if logical else tables.int().contiguous(), torch.empty(nt * hk * (s + 3)),
                        torch.empty(nt * nb1), torch.empty(nt * w, dtype=torch.long), cent, qsum, valid)
        cand, num_blocks, units, slots, tabs, ext, score, top = self._inputs[:8]
        self.out = torch.empty((r, hk, w) if logical else (r * hk, w), dtype=torch.long if logical else torch.int32)
        self.query: torch.Tensor | None = None
        self._tok = None if tok is None else tok.long().contiguous()
        self._query_layout: tuple | None = None
        self._layers = list(zip(*(_layer_ptrs(t) for t in (cent, qsum, valid)), strict=True))
        ptr = lambda t: None if t is None else t.data_ptr()    # noqa: E731
        # skv_select_blocks(cent, cent_row, cdt, qsum, q_row, slot, unit_slots, S, valid, cand, NB1, M, nblocks,
        #                   tables, R, H, D, W, ext, score, top, blocks, out_tables, query, query_stride, tok,
        #                   query_out, query_bytes, threads): 0, 3, 8 and 23 vary per layer
        self._args = [None, cent.stride(1), DTYPES[cent.dtype], None, qsum.stride(1), slots.data_ptr(),
                      units.data_ptr(), s, None, cand.data_ptr(), nb1, cand.shape[1] // nb1, num_blocks.data_ptr(),
                      ptr(tabs), r, hk, cent.shape[-1], w, ext.data_ptr(), score.data_ptr(), top.data_ptr(),
                      self.out.data_ptr() if logical else None, None if logical else self.out.data_ptr(),
                      None, 0, ptr(self._tok), None, 0, nt]
        self._fn = library().skv_select_blocks

    def __call__(self, layer: int, query: torch.Tensor | None = None) -> torch.Tensor:
        """One layer; ``query`` ``[T, Hq, D]`` the layer's query, whose rows ``tok`` are copied to :attr:`query`
        (left None when its heads are not contiguous: the caller copies them itself). Returns the head-split block
        tables ``[R * Hk, W]`` int32, or the logical blocks ``[R, Hk, W]`` int64 when the selector has no tables
        (the host tier maps them through the hot sets itself)."""
        args = self._args
        args[0], args[3], args[8] = self._layers[layer]
        if query is not None and self._tok is not None:
            layout = (query.dtype, query.shape[1:], query.stride())
            if layout != self._query_layout:
                self._bind_query(query, layout)
            args[23] = query.data_ptr() if self.query is not None else None
        self._fn(*args)
        return self.out

    def _bind_query(self, query: torch.Tensor, layout: tuple) -> None:
        """The query buffer for this layout (every layer of a step shares one), or none when the rows' heads are
        not contiguous."""
        self._query_layout = layout
        r, hk = self._args[14], self._args[15]
        if query.dim() != 3 or query.stride(2) != 1 or query.stride(1) != query.shape[2] or query.shape[1] % hk:
            self.query = None
            return
        hq, d = query.shape[1], query.shape[2]
        buf = torch.empty(r, hq, d, dtype=query.dtype)
        self.query = buf.view(r * hk, hq // hk, d)
        self._args[24] = query.stride(0) * query.element_size()
        self._args[26] = buf.data_ptr()
        self._args[27] = hq * d * query.element_size()


class Folder:
    """``UnitStore.fold_open`` for sum statistics, one step's rows (every layer): ``qsum[layer][slot] +=`` each
    row's query summed over each KV head's query group, ``key_sum[layer][slot] +=`` its key. The rows' token indices
    and slots, the store's tensors and the qkv layout are bound once per step (every layer's query / key are views
    of the same fused layout)."""

    def __init__(self, tok: torch.Tensor, slot: torch.Tensor, qsum: torch.Tensor,
                 key_sum: torch.Tensor | None) -> None:
        """qsum / key_sum: the store's ``[L, max_reqs, Hk, D]`` float32 sums (key_sum None: no key statistic)."""
        self._rows = (tok.long().contiguous(), slot.long().contiguous())
        self._sums = (qsum, key_sum)
        # each layer's rows by pointer arithmetic: no tensor made per layer (see BlockSelector)
        self._layers = list(zip(_layer_ptrs(qsum), _layer_ptrs(key_sum) if key_sum is not None
                                else [None] * qsum.shape[0], strict=True))
        self._args: list | None = None
        self._fn = library().skv_fold

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> bool:
        """query ``[T, Hq, D]`` / key ``[T, Hk, D]`` of one layer (rows may be strided views of the fused qkv
        output). Returns False, doing nothing, when the layout or dtype is one the kernel does not take (the
        caller folds in torch)."""
        args = self._args
        if args is None or args[1] != query.stride(0) or args[3] != key.stride(0):
            args = self._args = self._bind(query, key)
            if args is None:
                return False
        args[0], args[2] = query.data_ptr(), key.data_ptr()
        args[11], args[12] = self._layers[layer]
        self._fn(*args)
        return True

    def _bind(self, query: torch.Tensor, key: torch.Tensor) -> list | None:
        qsum = self._sums[0][0]
        hk, d = qsum.shape[1], qsum.shape[2]
        dtype = DTYPES.get(query.dtype)
        if (dtype is None or key.dtype != query.dtype or query.stride(1) != d or query.stride(2) != 1
                or key.stride(1) != d or key.stride(2) != 1 or query.shape[1] % hk or not qsum[0].is_contiguous()):
            return None
        tok, slot = self._rows
        # skv_fold(q, q_row, k, k_row, dtype, tok, slot, R, H, G, D, qsum, ksum, row): 0, 2, 11, 12 vary per layer
        return [None, query.stride(0), None, key.stride(0), dtype, tok.data_ptr(), slot.data_ptr(), tok.numel(),
                hk, query.shape[1] // hk, d, None, None, qsum.stride(0)]


class RowCopier:
    """Row ``src[i]`` of every layer's ``sources`` tensor into row ``dst[i]`` of that layer's ``targets`` tensor,
    every layer in one call (the host tier's spill on CPU: device cache blocks into host slots, no staging buffer
    and no temporary). The layers' base pointers are bound once."""

    @staticmethod
    def fits(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
        """Every tensor contiguous with rows of one byte size (what the copy assumes)."""
        tensors = [*targets, *sources]
        return (len(targets) == len(sources) and all(t.is_contiguous() for t in tensors)
                and len({t[0].numel() * t.element_size() for t in tensors}) == 1)

    def __init__(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        if not self.fits(targets, sources):
            raise ValueError("RowCopier needs contiguous tensors with rows of one size")
        row_bytes = targets[0][0].numel() * targets[0].element_size()
        layers = len(targets)
        self._ptrs = ((ctypes.c_void_p * layers)(*[t.data_ptr() for t in targets]),
                      (ctypes.c_void_p * layers)(*[t.data_ptr() for t in sources]))
        self._layers, self._row_bytes = layers, row_bytes
        self._fn = library().skv_copy_rows

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst`` / ``src`` ``[n]`` int64 row indices (CPU)."""
        dst, src = dst.long().contiguous(), src.long().contiguous()
        self._fn(ctypes.cast(self._ptrs[0], _P), ctypes.cast(self._ptrs[1], _P), self._layers, dst.data_ptr(),
                 src.data_ptr(), dst.numel(), self._row_bytes)


def hot_resolve(rows: torch.Tensor, logical: torch.Tensor, valid: torch.Tensor, host_slots: torch.Tensor,
                num_kv_heads: int, step: int, block_ids: torch.Tensor, holds: torch.Tensor, last: torch.Tensor,
                dev_rows: torch.Tensor, host_rows: torch.Tensor, entries: torch.Tensor,
                host_tab: torch.Tensor) -> tuple[int, int, int]:
    """``HotSets.resolve`` and ``make_resident``'s remap for one layer in one call (``kernels.c``,
    ``skv_hot_resolve``): ``rows`` ``[R]`` request slots, ``logical`` / ``valid`` ``[R, Hk, N]`` the selected
    logical blocks per KV head, ``host_slots`` ``[R, M]``; the layer's ``holds`` / ``last`` ``[slots, H]`` and the
    step's ``entries`` / ``host_tab`` ``[R, Hk * M]`` are updated in place, swap-ins copied from ``host_rows`` to
    ``dev_rows`` (one head slice per row). Every tensor on CPU and contiguous. Returns (hits, misses, loaded)."""
    r = rows.numel()
    k = num_kv_heads * host_slots.shape[1]
    h = block_ids.shape[1]
    logical, valid = logical.reshape(r, -1).long().contiguous(), valid.reshape(r, -1).contiguous()
    rows = rows.long().contiguous()
    count, marks = torch.empty(k, dtype=torch.int32), torch.empty(2, k, dtype=torch.uint8)
    top, victims, stats = torch.empty(logical.shape[1], dtype=torch.long), torch.empty(h, dtype=torch.long), \
        torch.zeros(3, dtype=torch.long)
    library().skv_hot_resolve(
        rows.data_ptr(), r, logical.data_ptr(), valid.data_ptr(), logical.shape[1], host_slots.data_ptr(),
        host_slots.shape[1], num_kv_heads, step, block_ids.data_ptr(), h, holds.data_ptr(), last.data_ptr(),
        dev_rows.data_ptr(), host_rows.data_ptr(), dev_rows.shape[1] * dev_rows.element_size(), entries.data_ptr(),
        host_tab.data_ptr(), count.data_ptr(), marks[0].data_ptr(), marks[1].data_ptr(), top.data_ptr(),
        victims.data_ptr(), stats.data_ptr())
    hits, misses, loaded = stats.tolist()
    return hits, misses, loaded
