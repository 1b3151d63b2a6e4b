"""FlashInferRaggedAttention's glue on the CPU, FlashInfer replaced by a torch stand-in.

Everything of ours around FlashInfer's decode call — the per-layer ragged plans, dummy
pages for empty rows and their masking, the tail over SGLang's token pool, Razor's
compensation, the merges, and the CUDA-graph mode's fixed-size padding (rows, pages, tail
slots, compensation buffers) — against the batched torch kernel, on random SGLang-shaped
batches with re-plans. The stand-in (``tests/fake_flashinfer.py``) implements FlashInfer's
contract with the reference attention; the real kernel and real graph capture/replay are
``tests/test_flashinfer_ragged.py`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import fake_flashinfer
from ragged_oracle import random_request
from test_shared_memory import _shared_copy, make_store

from headkv_sglang.kv.plan_tables import token_tables
from headkv_sglang.kv.pool import RaggedHeadKVPool
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

D = 16


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    import flashinfer_ext.decode as decode

    monkeypatch.setattr(decode, "_flashinfer", fake_flashinfer.module)


def batch_args(pool, L, H, gen, req_to_token, slots_total):
    """Two batches' ``rows_for_queries`` arguments: 5 and 2 random compressed requests."""
    free = torch.randperm(pool.num_pages, generator=gen).tolist()
    out = []
    for R in (5, 2):
        records, idxs, seq_lens = [], [], []
        perm = torch.randperm(slots_total, generator=gen)
        for r in range(R):
            prompt_len = int(torch.randint(1, 90, (1,), generator=gen))
            tail = int(torch.randint(1, 9, (1,), generator=gen))
            req_to_token[r, prompt_len:prompt_len + tail] = perm[r * 10:r * 10 + tail].to(req_to_token)
            records.append(random_request(pool, free, L, H, prompt_len, gen, comp=r % 3 == 1))
            idxs.append(r)
            seq_lens.append(prompt_len + tail)
        out.append((records, req_to_token, idxs, [rec.prompt_len for rec in records], seq_lens))
    return out


def batches(pool, L, H, gen, req_to_token, slots_total):
    return [rows_for_queries(*args) for args in batch_args(pool, L, H, gen, req_to_token, slots_total)]


@pytest.mark.parametrize("memory", ["split", "shared"])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("page_size", [1, 5])
def test_glue_matches_the_torch_kernel(graph, page_size, memory):
    """The glue over FlashInfer's stand-in vs the torch kernel over the separate pool; with
    ``shared`` the glue reads the same pages moved into SGLang's token slots (one memory)."""
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    gen = torch.Generator().manual_seed(page_size + 10 * graph)
    L, H, G = 2, 2, 3
    pool = RaggedHeadKVPool(4000, page_size, D, torch.float32, "cpu")
    pool.k_pages.normal_(generator=gen)
    pool.v_pages.normal_(generator=gen)
    slots_total = 60
    k_buf = torch.randn(slots_total, H, D, generator=gen)
    v_buf = torch.randn(slots_total, H, D, generator=gen)
    req_to_token = torch.zeros(5, 100, dtype=torch.int32)
    kw = dict(cuda_graph=True, max_rows=6, max_pages=5 * H * (90 // page_size + 1), max_tail=50) if graph else {}
    args = batch_args(pool, L, H, gen, req_to_token, slots_total)
    ref_rows = [rows_for_queries(*a) for a in args]
    fi_pool, fi_rows = pool, ref_rows
    if memory == "shared":  # the same pages' contents at pages of chunks of token slots
        _, alloc, fi_pool = make_store(L, H, D, page_size, 2500, seed=page_size)
        fi_pool.k_all.normal_(generator=gen)
        fi_pool.v_all.normal_(generator=gen)
        distinct = list({id(r): r for a in args for r in a[0]}.values())
        moved = dict(zip(map(id, distinct), _shared_copy(pool, distinct, alloc, fi_pool)))
        fi_rows = [rows_for_queries([moved[id(r)] for r in a[0]], *a[1:]) for a in args]
    fi = FlashInferRaggedAttention(fi_pool, L, H, H * G, 0.25, workspace_bytes=8, **kw)
    assert fi.shared == (memory == "shared")
    ref = TorchRaggedAttention(pool, L, H)
    first, second = ref_rows
    assert any(lp.comp_count is not None for rec in first.records for lp in rec.layers)
    for i in (0, 1, 0):
        fi.plan(fi_rows[i])
        ref.plan(ref_rows[i])
        n = ref_rows[i].num_rows
        for layer in range(L):
            q = torch.randn(6 if graph else n, H * G, D, generator=gen)
            got = fi.run(layer, q, k_buf, v_buf, 0.25)
            assert got.shape == q.shape
            torch.testing.assert_close(got[:n], ref.run(layer, q[:n], k_buf, v_buf, 0.25), atol=1e-5, rtol=1e-5)


def test_token_tables_match_a_per_token_walk():
    """``token_tables`` vs the CSR page table walked token by token, dummy rows included."""
    gen = torch.Generator().manual_seed(3)
    for page_size in (1, 3, 7):
        counts = torch.randint(0, 5, (11,), generator=gen)
        last = torch.where(counts > 0, torch.randint(1, page_size + 1, (11,), generator=gen), 0)
        counts[4], last[4] = 1, 1  # a dummy page of one token (an empty row, as the glue plans it)
        indptr = torch.zeros(12, dtype=torch.int32)
        torch.cumsum(counts, 0, out=indptr[1:])
        ids = torch.randperm(200, generator=gen)[:int(counts.sum())].to(torch.int32)
        got_indptr, got_addr, got_last = token_tables(indptr, ids, last.to(torch.int32), page_size)
        want, want_indptr = [], [0]
        for r in range(11):
            pages = ids[int(indptr[r]):int(indptr[r + 1])].tolist()
            for j, p in enumerate(pages):
                for t in range(int(last[r]) if j == len(pages) - 1 else page_size):
                    want.append(p * page_size + t)
            want_indptr.append(len(want))
        assert got_addr.dtype == torch.int64 and got_addr.tolist() == want
        assert got_indptr.tolist() == want_indptr and got_last.tolist() == [1] * 11


def test_graphed_glue_refuses_what_its_buffers_cannot_hold():
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    gen = torch.Generator().manual_seed(5)
    pool = RaggedHeadKVPool(4000, 4, D, torch.float32, "cpu")
    req_to_token = torch.zeros(5, 100, dtype=torch.int32)
    first, _ = batches(pool, 1, 2, gen, req_to_token, 60)
    with pytest.raises(ValueError, match=r"cuda_graph needs max_rows, max_pages and max_tail > 0"):
        FlashInferRaggedAttention(pool, 1, 2, 4, 0.25, workspace_bytes=8, cuda_graph=True, max_rows=4)
    small = FlashInferRaggedAttention(pool, 1, 2, 4, 0.25, workspace_bytes=8, cuda_graph=True, max_rows=4,
                                      max_pages=1000, max_tail=100)
    with pytest.raises(ValueError, match=r"5 compressed rows, the graphed kernel holds at most 4"):
        small.plan(first)
    tight = FlashInferRaggedAttention(pool, 1, 2, 4, 0.25, workspace_bytes=8, cuda_graph=True, max_rows=5,
                                      max_pages=1000, max_tail=2)
    with pytest.raises(ValueError, match=r"tail slots, the graphed kernel holds at most 2"):
        tight.plan(first)
    pages = int(sum(rec.layers[0].kv_indices.numel() for rec in first.records))
    few = FlashInferRaggedAttention(pool, 1, 2, 4, 0.25, workspace_bytes=8, cuda_graph=True, max_rows=5,
                                    max_pages=pages - 1, max_tail=100)
    with pytest.raises(ValueError, match=rf"layer 0 needs {pages} pages, the graphed kernel holds at most {pages - 1}"):
        few.plan(first)


@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_shared_case_with_the_stand_in(page_size):
    """The GPU test's one-memory case (``tests/test_flashinfer_ragged.py``), run here on the
    stand-in in float32: its setup and comparison hold before a GPU runs them."""
    import test_flashinfer_ragged as gpu

    gpu.shared_case(page_size, 4, "cpu", torch.float32)
