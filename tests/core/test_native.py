"""The native CPU kernels (``sentencekv_vllm/native``) against the torch reference they replace on CPU: the same
blocks in the same order as ``block_scores`` + ``select_blocks`` + ``physical_tables``, and the same fold as
``UnitStore.fold_open``, bit for bit. Scores use small integers so that both summation orders are exact (ties
included); random rows, spans, budgets, invalid units and padding."""

from __future__ import annotations

import platform

import pytest
import torch

from sentencekv_vllm import native
from sentencekv_vllm.core.blocks import block_scores, head_split_tables, physical_tables, plan_blocks, select_blocks
from sentencekv_vllm.core.index import sentence_centroids
from sentencekv_vllm.core.selection import PAD_POS
from sentencekv_vllm.integration.state import UnitStore

pytestmark = pytest.mark.skipif(native.library() is None, reason="native kernels not built (no C compiler here)")

HK, HQ, D, BS = 3, 9, 64, 32


def _rows(gen: torch.Generator, rows: int):
    """Random rows: spans of 1..70 tokens over 400..3000-token rows, padded to ``[rows, S]``."""
    spans, lens = [], []
    for _ in range(rows):
        n = int(torch.randint(400, 3000, (1,), generator=gen))
        cuts, pos = [], 0
        while pos < n - 40:
            end = min(n - 40, pos + int(torch.randint(1, 70, (1,), generator=gen)))
            cuts.append((pos, end))
            pos = end
        spans.append(cuts)
        lens.append(n)
    s = max(len(x) for x in spans)
    starts = torch.full((rows, s), PAD_POS, dtype=torch.long)
    ends, unit_valid = starts.clone(), torch.zeros(rows, s, dtype=torch.bool)
    for i, sp in enumerate(spans):
        starts[i, :len(sp)] = torch.tensor([a for a, _ in sp])
        ends[i, :len(sp)] = torch.tensor([b for _, b in sp])
        unit_valid[i, :len(sp)] = True
    return starts, ends, unit_valid, torch.tensor(lens)


def _group(gen: torch.Generator, rows: int, budgets: list[int]):
    """A random sparse group's plan (some units invalid per head: the caller's store)."""
    starts, ends, unit_valid, seq = _rows(gen, rows)
    plan = plan_blocks(starts, ends, unit_valid, seq, torch.tensor(budgets), 32, seq - 40, BS)
    return plan, unit_valid


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The native selection shares a batch's rows among torch's threads (OpenMP builds): one and two."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("index_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,budgets", [(1, [1024]), (1, [256]), (3, [512, 1024, 320]), (8, [1024] * 8)])
def test_block_selection_matches_torch(rows, budgets, index_dtype, threads):
    """Every index dtype (the index is kept in the model's dtype): the torch path scores the same values in
    float32; with one thread and with the rows shared among two."""
    _check_selection(rows, budgets, index_dtype)


FALLBACKS = {   # a compiler wrapper for each build the library falls back to on other machines
    "no-openmp": 'for a in "$@"; do [ "$a" = "-fopenmp" ] && exit 1; done\nexec cc "$@"\n',
    "no-avx2": 'exec cc "$@" -mno-avx2 -mno-fma -mno-avx512f\n',
}


@pytest.mark.parametrize("build", sorted(FALLBACKS))
def test_fallback_builds_select_the_same_blocks(build, tmp_path, monkeypatch):
    """A compiler without OpenMP (one thread), a CPU without AVX2 (the portable dot): the same blocks."""
    if build == "no-avx2" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n" + FALLBACKS[build])
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SENTENCEKV_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        assert native.threads() == (1 if build == "no-openmp" else torch.get_num_threads())
        _check_selection(8, [1024] * 8, torch.bfloat16)
        _check_selection(3, [512, 1024, 320], torch.float32)
    finally:
        native.library.cache_clear()


def _check_selection(rows: int, budgets: list[int], index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * 7 + budgets[0])
    plan, unit_valid = _group(gen, rows, budgets)
    s = unit_valid.shape[1]
    store = UnitStore(1, HK, HQ, D, 16, torch.device("cpu"), ("centroid",), unit_dtype=index_dtype)
    pool = torch.tensor(store.alloc_units(rows * s + 64))     # rows' units scattered over the pool
    slots = pool[torch.randperm(len(pool), generator=gen)[:rows * s]].view(rows, s)
    # small integers: exact dot products in any order; few distinct values: many ties
    store.set_units("centroid", 0, slots, torch.randint(-2, 3, (rows, s, HK, D), generator=gen).float())
    store.valid[0, slots] = (torch.rand(rows, s, HK, generator=gen) > 0.1) & unit_valid[..., None]
    req_slots = torch.randperm(16, generator=gen)[:rows]
    store.qsum[0, req_slots] = torch.randint(-3, 4, (rows, HK, D), generator=gen).float()
    valid = store.valid_rows(0, slots)
    table = torch.randperm(rows * 200, generator=gen).int().view(rows, 200)[:, :plan.base.shape[1]]
    tables = head_split_tables(table, HK, plan.trash)

    units = store.unit_rows(0, slots, ("centroid",))["centroid"]
    scores = (units * store.query_sums(0, req_slots)[:, None]).sum(-1).transpose(1, 2)
    blocks = select_blocks(block_scores(scores, plan, valid.transpose(1, 2)), plan)

    pools = (store.units["centroid"], store.qsum, store.valid)
    by_table = native.BlockSelector(plan, slots, req_slots, tables, HK, *pools)(0)
    by_block = native.BlockSelector(plan, slots, req_slots, None, HK, *pools)(0)
    assert torch.equal(by_block, blocks)
    assert torch.equal(by_table, physical_tables(blocks, tables))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_copies_the_head_split_query(dtype, threads):
    """The selection call copies the rows' query (scattered rows of a strided qkv view) into the head-split
    kernel's query, each layer into the same buffer; a query whose heads are not contiguous is left to the caller."""
    gen = torch.Generator().manual_seed(5)
    rows = 3
    plan, unit_valid = _group(gen, rows, [512, 1024, 320])
    s = unit_valid.shape[1]
    store = UnitStore(2, HK, HQ, D, 16, torch.device("cpu"), ("centroid",), unit_dtype=dtype)
    slots = torch.tensor(store.alloc_units(rows * s)).view(rows, s)
    tok = torch.tensor([7, 2, 4])
    selector = native.BlockSelector(plan, slots, torch.arange(rows), None, HK, store.units["centroid"], store.qsum,
                                    store.valid, tok)
    buffer = None
    for layer in range(2):
        fused = torch.randn(9, (HQ + 2 * HK) * D, generator=gen).to(dtype)
        query = fused[:, :HQ * D].view(9, HQ, D)
        selector(layer, query)
        assert torch.equal(selector.query, query[tok].reshape(rows * HK, HQ // HK, D))
        buffer = buffer if buffer is not None else selector.query.data_ptr()
        assert selector.query.data_ptr() == buffer
    selector(0, torch.randn(HQ, 9, D, generator=gen).to(dtype).transpose(0, 1))
    assert selector.query is None


@pytest.mark.parametrize("keep_unretained", [True, False])
@pytest.mark.parametrize("retain", [None, 0.3, 0.0])
def test_centroids_match_torch_bit_for_bit(retain, keep_unretained, threads):
    """The index's sentence centroids: the same bits as ``core.index.sentence_centroids`` (bf16 keys upcast, as
    the index builds them), with and without a retention mask, and sentences that retained nothing."""
    gen = torch.Generator().manual_seed(11)
    t = 700
    keys = torch.randn(t, HK, D, generator=gen).bfloat16().float() * 3
    cuts = torch.sort(torch.randperm(t - 1, generator=gen)[:60] + 1).values.tolist()
    bounds = [0, *cuts, t]
    spans = torch.tensor([[a, b] for a, b in zip(bounds, bounds[1:], strict=False)])
    retained = None if retain is None else torch.rand(HK, t, generator=gen) < retain
    expected = sentence_centroids(keys, spans, retained, keep_unretained)
    found = native.sentence_centroids(keys, spans, retained, keep_unretained)
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fold_matches_torch_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(3)
    layers, t, rows = 2, 11, 4
    fused = torch.randn(t, (HQ + 2 * HK) * D, generator=gen).to(dtype)      # qkv output: q / k are strided views
    query = fused[:, :HQ * D].view(t, HQ, D)
    key = fused[:, HQ * D:(HQ + HK) * D].view(t, HK, D)
    tok = torch.tensor([1, 4, 5, 9])
    slot = torch.tensor([6, 0, 3, 2])
    torch_store = UnitStore(layers, HK, HQ, D, 8, torch.device("cpu"), ("centroid",), {"key_sum": "sum"})
    native_store = UnitStore(layers, HK, HQ, D, 8, torch.device("cpu"), ("centroid",), {"key_sum": "sum"})
    for store in (torch_store, native_store):
        store.qsum.normal_(generator=gen)
        store.open["key_sum"].copy_(torch_store.open["key_sum"].normal_(generator=gen))
    native_store.qsum.copy_(torch_store.qsum)
    for _ in range(3):     # several steps: sums keep accumulating
        q = query[tok].view(rows, HK, -1, D).sum(2, dtype=torch.float32)
        torch_store.fold_open(1, slot, q, key[tok].float())
        assert native.Folder(tok, slot, native_store.qsum, native_store.open["key_sum"])(1, query, key)
    assert torch.equal(native_store.qsum, torch_store.qsum)
    assert torch.equal(native_store.open["key_sum"], torch_store.open["key_sum"])


def test_fold_declines_layouts_it_does_not_take():
    query = torch.randn(4, HQ, D).transpose(0, 1).contiguous().transpose(0, 1)     # heads not contiguous
    key = torch.randn(4, HK, D)
    qsum = torch.zeros(1, 8, HK, D)
    assert not native.Folder(torch.tensor([0]), torch.tensor([1]), qsum, None)(0, query, key)
    assert qsum.abs().sum() == 0


def test_a_failing_compiler_is_reported_with_its_message(tmp_path, monkeypatch):
    """The build's error names the compiler's complaint (logged by ``library()``, which then runs the torch path)."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc 1.0 && exit 0\n"
                  "echo 'fatal: no room' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SENTENCEKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="fatal: no room"):
        native._build()


def test_row_copier_takes_only_rows_of_one_size():
    """The host pool falls back to ``index_copy_`` when the copy's layout assumption does not hold."""
    rows = torch.zeros(4, 8)
    assert native.RowCopier.fits([rows], [torch.zeros(6, 8)])
    assert not native.RowCopier.fits([rows], [torch.zeros(6, 4)])                       # other row size
    assert not native.RowCopier.fits([rows], [torch.zeros(8, 6).t()])                     # not contiguous
    assert not native.RowCopier.fits([rows, rows], [rows])                                # layers differ


@pytest.mark.parametrize("seed", range(6))
def test_block_plan_matches_torch(seed):
    """Every field of the per-step plan, native vs torch: rows of different lengths and budgets (below and above
    a row's blocks), invalid units, sinks over several blocks, tails reaching back past the budget, long units
    (several blocks: the candidate lists widen past the first try's room)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 + seed % 4
    starts, ends, unit_valid, seq = _rows(gen, rows)
    unit_valid &= torch.rand(unit_valid.shape, generator=gen) > 0.2
    if seed % 2:    # every unit one token: up to 32 units per block
        ends = torch.where(unit_valid, starts + 1, ends)
    budgets = torch.randint(1, 48, (rows,), generator=gen) * BS // 2
    for sinks, back in ((32, 40), (100, 300), (0, 5000), (4, -7)):
        args = (starts, ends, unit_valid, seq, budgets, sinks, seq - back, BS)
        want, got = plan_blocks(*args), native.plan_blocks(*args)
        for name in ("base", "fixed", "num_blocks", "seq_lens", "cand", "tie"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert (got.drop is None) == (want.drop is None)
        assert got.drop is None or torch.equal(got.drop, want.drop)
