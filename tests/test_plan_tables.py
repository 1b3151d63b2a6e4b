"""Incremental page tables (``kv/plan_tables.py``) against tables built from scratch, over random
sequences of batch changes; and both kernels' outputs across those changes.

A batch change is what continuous batching does between steps: requests leave (from anywhere
in the batch), new ones join at the end, a request's decode-phase compression moves tail
tokens into its pages (a new record whose rows grew), two requests read one shared prompt
(``kv_share``: the same ``layers``), an extend batch repeats a request's record once per
query token. Records have odd sizes, empty rows (a head that kept nothing) and, on some,
Razor's compensation. The reference is a per-row Python loop over each layer's
``LayerPages``, written independently of the vectorised code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fake_flashinfer
from ragged_oracle import oracle_row, random_request

from headkv_sglang.kv.plan_tables import TableCache, assemble, build_record_tables
from headkv_sglang.kv.pool import LayerPages, RaggedHeadKVPool
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

D = 8


def naive_tables(records, layer: int, page_size: int, dummy_empty: bool, pad_to: int | None):
    """Layer ``layer``'s CSR table of ``records`` (one per row), one (row, head) at a time."""
    indptr, indices, last, empty, lengths = [0], [], [], [], []
    for rec in records:
        lp = rec.layers[layer]
        for h in range(lp.lengths.numel()):
            pages = lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])].tolist()
            n = int(lp.lengths[h])
            if n == 0 and dummy_empty:
                pages = [0]
            indices += pages
            indptr.append(len(indices))
            last.append(1 if n == 0 and dummy_empty else 0 if n == 0 else (n - 1) % page_size + 1)
            empty.append(n == 0)
            lengths.append(n)
    H = records[0].layers[layer].lengths.numel()
    for _ in range(((pad_to or len(records)) - len(records)) * H):
        if dummy_empty:
            indices.append(0)
        indptr.append(len(indices))
        last.append(1 if dummy_empty else 0)
        empty.append(True)
        lengths.append(0)
    return indptr, indices, last, empty, lengths


def naive_comp(records, layer: int, H: int, pad_to: int | None):
    """``k, v [rows, H, D]`` and ``bias [rows, H]`` of one layer (zeros / -inf without compensation)."""
    rows = pad_to or len(records)
    k, v = torch.zeros(rows, H, D), torch.zeros(rows, H, D)
    bias = torch.full((rows, H), -math.inf)
    for r, rec in enumerate(records):
        lp = rec.layers[layer]
        if lp.comp_count is None:
            continue
        for h in range(H):
            k[r, h], v[r, h] = lp.comp_k[h], lp.comp_v[h]
            c = int(lp.comp_count[h])
            bias[r, h] = math.log(c) if c > 0 else -math.inf
    return k, v, bias


def grow(rec, free: list[int], page_size: int, gen: torch.Generator):
    """``rec`` after a decode move: each row gets 1..page_size+3 tokens more (0..2 new pages)."""
    layers = []
    for lp in rec.layers:
        H = lp.lengths.numel()
        add = torch.randint(1, page_size + 4, (H,), generator=gen)
        lengths = lp.lengths + add
        counts = (lengths + page_size - 1) // page_size
        parts = []
        for h in range(H):
            old = lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])]
            parts += [old, torch.tensor([free.pop() for _ in range(int(counts[h]) - old.numel())], dtype=torch.int64)]
        indptr = torch.zeros(H + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=indptr[1:])
        new = dataclasses.replace(lp, kv_indptr=indptr, kv_indices=torch.cat(parts), lengths=lengths)
        new._page_size = page_size
        layers.append(new)
    return dataclasses.replace(rec, layers=layers, tail_start=rec.prompt_len + 1)


class PageIds(list):
    """Page ids handed out in random order, reshuffled when used up (pages are only read here)."""

    def __init__(self, num_pages: int, gen: torch.Generator):
        super().__init__()
        self.num_pages, self.gen = num_pages, gen

    def pop(self, *args):
        if not self:
            self.extend(torch.randperm(self.num_pages, generator=self.gen).tolist())
        return super().pop(*args)


def batch_changes(gen, pool, L: int, H: int, steps: int):
    """A random sequence of batches (lists of records, one per row) as continuous batching makes them."""
    free = PageIds(pool.num_pages, gen)
    new = lambda: random_request(pool, free, L, H, int(torch.randint(1, 70, (1,), generator=gen)), gen,
                                 comp=bool(torch.rand(1, generator=gen) < 0.3))
    batch = [new() for _ in range(5)]
    out = [list(batch)]
    for _ in range(steps):
        kind = int(torch.randint(0, 6, (1,), generator=gen))
        if kind == 0 and len(batch) > 1:  # a request leaves from anywhere
            batch.pop(int(torch.randint(0, len(batch), (1,), generator=gen)))
        elif kind == 1:  # one joins at the end
            batch.append(new())
        elif kind == 2:  # one out, one in
            batch.pop(int(torch.randint(0, len(batch), (1,), generator=gen)))
            batch.append(new())
        elif kind == 3:  # a decode move: one record replaced by a grown one, same place
            i = int(torch.randint(0, len(batch), (1,), generator=gen))
            batch[i] = grow(batch[i], free, pool.page_size, gen)
        elif kind == 4:  # kv_share: a request reading another's prompt (the same layers)
            src = batch[int(torch.randint(0, len(batch), (1,), generator=gen))]
            batch.append(dataclasses.replace(src, page_ids=[]))
        # kind 5: the batch did not change
        rows = list(batch)
        if torch.rand(1, generator=gen) < 0.25:  # an extend batch: a record once per query token
            i = int(torch.randint(0, len(rows), (1,), generator=gen))
            rows = rows[:i + 1] + [rows[i]] * int(torch.randint(1, 4, (1,), generator=gen)) + rows[i + 1:]
        out.append(rows)
    return out


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("dummy_empty,pad", [(False, 0), (True, 0), (True, 3)])
def test_incremental_tables_equal_tables_built_from_scratch(page_size, dummy_empty, pad):
    gen = torch.Generator().manual_seed(page_size * 7 + 3 * dummy_empty + pad)
    L, H = 3, 5
    pool = RaggedHeadKVPool(6000, page_size, D, torch.float32, "cpu")
    cache = TableCache(page_size, D, torch.float32, "cpu", dummy_empty=dummy_empty)
    seen: set[int] = set()
    for rows in batch_changes(gen, pool, L, H, steps=40):
        pad_to = len(rows) + pad if pad else None
        built = cache.built
        bt = cache.batch(rows, pad_to=pad_to)
        fresh = {id(r.layers) for r in rows} - seen
        assert cache.built - built == len(fresh), "only the requests not seen before are built"
        seen |= fresh
        assert bt.rows == (pad_to or len(rows)) and bt.pad == (pad_to or len(rows)) - len(rows)
        for layer in range(L):
            indptr, indices, last, empty, lengths = naive_tables(rows, layer, page_size, dummy_empty, pad_to)
            got_indptr, got_ids, got_last, got_empty, any_empty = bt.per_layer()[layer]
            assert got_indptr.tolist() == indptr
            assert got_ids.tolist() == indices and bt.indices(layer).tolist() == indices
            assert got_last.tolist() == last
            assert got_empty.tolist() == empty and any_empty == any(empty)
            assert bt.lengths[layer].tolist() == lengths
            real = sum((n + page_size - 1) // page_size for n in lengths)
            assert bt.pages[layer] == real
            if any(r.layers[layer].comp_count is not None for r in rows):
                k, v, bias = naive_comp(rows, layer, H, pad_to)
                assert bt.comp is not None
                torch.testing.assert_close(bt.comp[0][layer], k)
                torch.testing.assert_close(bt.comp[1][layer], v)
                torch.testing.assert_close(bt.comp[2][layer], bias)
        if all(lp.comp_count is None for r in rows for lp in r.layers):
            assert bt.comp is None


def test_tables_refuse_what_they_cannot_hold():
    lp = LayerPages(kv_indptr=torch.tensor([0, 1, 2]), kv_indices=torch.tensor([4, 5]), lengths=torch.tensor([3, 20]))
    ok = LayerPages(kv_indptr=torch.tensor([0, 1, 3]), kv_indices=torch.tensor([4, 5, 6]), lengths=torch.tensor([3, 20]))
    with pytest.raises(ValueError, match=r"layer 1: pages per row \[1, 1\] do not hold lengths \[3, 20\] at page_size 16"):
        build_record_tables([ok, lp], 16, D, torch.float32, "cpu", dummy_empty=True)
    three = LayerPages(kv_indptr=torch.tensor([0, 1, 2, 3]), kv_indices=torch.tensor([4, 5, 6]),
                       lengths=torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match=r"layer 1 has 3 KV heads .*, layer 0 has 2"):
        build_record_tables([ok, three], 16, D, torch.float32, "cpu", dummy_empty=False)
    piece = build_record_tables([ok], 16, D, torch.float32, "cpu", dummy_empty=True)
    with pytest.raises(ValueError, match=r"2 rows, more than the 1 the batch is padded to"):
        assemble([piece, piece], 16, "cpu", pad_to=1, dummy_empty=True)
    with pytest.raises(ValueError, match="at least one compressed row"):
        assemble([], 16, "cpu")


def test_the_cache_forgets_requests_no_batch_holds():
    gen = torch.Generator().manual_seed(4)
    pool = RaggedHeadKVPool(20000, 2, D, torch.float32, "cpu")
    free = list(range(20000))
    cache = TableCache(2, D, torch.float32, "cpu", dummy_empty=False)
    for _ in range(80):  # a stream of single-request batches
        cache.batch([random_request(pool, free, 1, 2, 5, gen, comp=False)])
        free = list(range(20000))
    assert len(cache._pieces) <= 2 + 64 + 1


def _run_all(kernel, rows, layers, Hq, k_buf, v_buf, gen, pad_to=None):
    out = []
    for layer in range(layers):
        q = torch.randn(pad_to or rows.num_rows, Hq, D, generator=gen)
        out.append((q, kernel.run(layer, q, k_buf, v_buf, 0.3)))
    return out


def _rows(records, req_to_token, gen):
    starts = [r.tail_start if r.tail_start >= 0 else r.prompt_len for r in records]
    for i, s in enumerate(starts):  # each row's tail: a few slots of its own
        req_to_token[i, s:s + 6] = torch.randperm(200, generator=gen)[:6].to(torch.int32)
    ends = [s + 1 + int(torch.randint(0, 5, (1,), generator=gen)) for s in starts]
    return rows_for_queries(records, req_to_token, list(range(len(records))), starts, ends)


@pytest.mark.parametrize("page_size", [1, 4])
def test_torch_kernel_across_batch_changes_matches_a_fresh_kernel_and_the_oracle(page_size):
    gen = torch.Generator().manual_seed(40 + page_size)
    L, H, G = 2, 3, 2
    pool = RaggedHeadKVPool(6000, page_size, D, torch.float32, "cpu")
    pool.k_pages.normal_(generator=gen)
    pool.v_pages.normal_(generator=gen)
    k_buf, v_buf = torch.randn(200, H, D, generator=gen), torch.randn(200, H, D, generator=gen)
    req_to_token = torch.zeros(64, 120, dtype=torch.int32)
    kernel = TorchRaggedAttention(pool, L, H)
    for records in batch_changes(gen, pool, L, H, steps=12):
        rows = _rows(records, req_to_token, gen)
        kernel.plan(rows)
        fresh = TorchRaggedAttention(pool, L, H)
        fresh.plan(rows)
        for layer in range(L):
            q = torch.randn(rows.num_rows, H * G, D, generator=gen)
            got = kernel.run(layer, q, k_buf, v_buf, 0.3)
            torch.testing.assert_close(got, fresh.run(layer, q, k_buf, v_buf, 0.3), atol=0, rtol=0)
            for i in (0, rows.num_rows - 1):
                slots = rows.tail_slots[int(rows.tail_indptr[i]):int(rows.tail_indptr[i + 1])]
                want = oracle_row(pool, records[i].layers[layer], q[i], k_buf[slots], v_buf[slots], 0.3)
                torch.testing.assert_close(got[i], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("graph", [False, True])
def test_flashinfer_glue_across_batch_changes_matches_the_torch_kernel(monkeypatch, graph):
    import flashinfer_ext.decode as decode
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    monkeypatch.setattr(decode, "_flashinfer", fake_flashinfer.module)
    gen = torch.Generator().manual_seed(50 + graph)
    L, H, G, ps = 2, 2, 3, 3
    pool = RaggedHeadKVPool(6000, ps, D, torch.float32, "cpu")
    pool.k_pages.normal_(generator=gen)
    pool.v_pages.normal_(generator=gen)
    k_buf, v_buf = torch.randn(200, H, D, generator=gen), torch.randn(200, H, D, generator=gen)
    req_to_token = torch.zeros(64, 120, dtype=torch.int32)
    kw = dict(cuda_graph=True, max_rows=24, max_pages=3000, max_tail=200) if graph else {}
    fi = FlashInferRaggedAttention(pool, L, H, H * G, 0.3, workspace_bytes=8, **kw)
    ref = TorchRaggedAttention(pool, L, H)
    for records in batch_changes(gen, pool, L, H, steps=10):
        if len(records) > 24:
            continue
        rows = _rows(records, req_to_token, gen)
        fi.plan(rows)
        ref.plan(rows)
        n = rows.num_rows
        for layer in range(L):
            q = torch.randn(24 if graph else n, H * G, D, generator=gen)
            got = fi.run(layer, q, k_buf, v_buf, 0.3)
            torch.testing.assert_close(got[:n], ref.run(layer, q[:n], k_buf, v_buf, 0.3), atol=1e-5, rtol=1e-5)


def test_an_unchanged_batch_plans_no_prompt_tables(monkeypatch):
    """The next decode step of the same requests: no layer's prompt rows are planned again, no
    tables assembled; only the tail (one plan for all layers)."""
    import flashinfer_ext.decode as decode
    import headkv_sglang.kv.plan_tables as plan_tables
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    monkeypatch.setattr(decode, "_flashinfer", fake_flashinfer.module)
    calls = {"assemble": 0, "wrapper": 0}
    real_assemble, real_plan = plan_tables.assemble, fake_flashinfer.BatchDecodeWithPagedKVCacheWrapper.plan

    def counted_assemble(*a, **kw):
        calls["assemble"] += 1
        return real_assemble(*a, **kw)

    def counted_plan(self, *a, **kw):
        calls["wrapper"] += 1
        return real_plan(self, *a, **kw)

    monkeypatch.setattr(plan_tables, "assemble", counted_assemble)
    monkeypatch.setattr(fake_flashinfer.BatchDecodeWithPagedKVCacheWrapper, "plan", counted_plan)
    gen = torch.Generator().manual_seed(6)
    L, H = 4, 2
    pool = RaggedHeadKVPool(2000, 4, D, torch.float32, "cpu")
    free = list(range(2000))
    records = [random_request(pool, free, L, H, 30, gen, comp=False) for _ in range(3)]
    req_to_token = torch.arange(3 * 60, dtype=torch.int32).view(3, 60)
    for kernel in (FlashInferRaggedAttention(pool, L, H, 2 * H, 0.3, workspace_bytes=8), TorchRaggedAttention(pool, L, H)):
        kernel.plan(rows_for_queries(records, req_to_token, [0, 1, 2], [30] * 3, [31, 33, 35]))
        before = dict(calls)
        kernel.plan(rows_for_queries(records, req_to_token, [0, 1, 2], [30] * 3, [32, 34, 36]))
        assert calls["assemble"] == before["assemble"]
        tail_plans = 1 if isinstance(kernel, FlashInferRaggedAttention) else 0
        assert calls["wrapper"] - before["wrapper"] == tail_plans
        kernel.plan(rows_for_queries(records[:2], req_to_token, [0, 1], [30] * 2, [32, 34]))  # one left
        assert calls["assemble"] == before["assemble"] + 1


def test_the_plan_cost_benchmark_runs(tmp_path):
    """``benchmarks/plan_cost.py`` at a tiny shape (its numbers are measured by hand, not here)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import plan_cost

    out = tmp_path / "plan"
    assert plan_cost.main(["--layers", "3", "--kv-heads", "2", "--q-heads", "4", "--head-dim", "8", "--requests", "3",
                           "--context", "300", "--budget", "20", "--tail", "5", "--page-size", "4", "--comp-every", "2",
                           "--kernels", "flashinfer", "torch", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    for kernel in ("flashinfer", "torch"):
        for case in plan_cost.CASES:
            times = res["runs"]["this tree"][0][kernel][case]
            assert len(times) == 2 and all(t >= 0 for t in times)
    assert "| flashinfer | one in + one out |" in out.with_suffix(".md").read_text()
