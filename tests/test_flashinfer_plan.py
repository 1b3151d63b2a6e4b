"""flashinfer_ext's decode plan (CPU part): CSR rows per (request, KV head) over real pool pages."""

from __future__ import annotations

import math

import pytest
import torch
from ragged_oracle import kernel_attend

from flashinfer_ext.plan import build_decode_plan, fill_empty_rows, pad_plan, ragged_decode_torch
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.config import KVPolicyConfig, ModelShape


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_plan_over_compressed_pages_matches_manager_attention(page_size, group):
    torch.manual_seed(page_size * 10 + group)
    H, D, Lyr = 2, 8, 2
    shape = ModelShape(num_layers=Lyr, num_q_heads=H * group, num_kv_heads=H, head_dim=D)
    mgr = CompressionManager(shape, num_pages=4096, page_size=page_size, dtype=torch.float32, device="cpu", only_if_smaller=False)
    lengths = [5, 54, 97]
    for r, T in enumerate(lengths):
        k = torch.randn(Lyr, T, H, D)
        v = torch.randn(Lyr, T, H, D)
        q = torch.randn(Lyr, T, H * group, D)
        mgr.begin_extend(r, f"req{r}", window=4)
        for layer in range(Lyr):
            mgr.capture_queries(layer, r, q[layer])
        mgr.compress(r, KVPolicyConfig(policy="snapkv", budget=13, window=4), T, lambda l: (k[l], v[l]))
    scale = 1 / math.sqrt(D)
    for layer in range(Lyr):
        plan = build_decode_plan([mgr.records[r].layers[layer] for r in range(len(lengths))], page_size)
        assert plan.kv_indptr.dtype == torch.int32 and plan.num_rows == len(lengths) * H
        assert ((plan.kv_last_page_len >= 1) & (plan.kv_last_page_len <= page_size)).all()
        qd = torch.randn(len(lengths), H, group, D)
        o, lse = ragged_decode_torch(qd, mgr.pool.k_pages, mgr.pool.v_pages, plan, scale)
        for r, T in enumerate(lengths):
            ref = kernel_attend(mgr, layer, r, qd[r].reshape(1, H * group, D), torch.zeros(0, H, D), torch.zeros(0, H, D),
                             torch.tensor([T]), scale)
            torch.testing.assert_close(o[r].reshape(H * group, D), ref[0], atol=1e-5, rtol=1e-5)
    mgr.check_integrity()


def test_plan_rejects_inconsistent_tables():
    from headkv_sglang.kv.pool import LayerPages

    lp = LayerPages(kv_indptr=torch.tensor([0, 1, 2]), kv_indices=torch.tensor([4, 5]), lengths=torch.tensor([3, 20]))
    with pytest.raises(ValueError, match=r"pages per row \[1, 1\] do not hold lengths \[3, 20\] at page_size 16"):
        build_decode_plan([lp], 16)


def _random_layers(gen, rows: int, H: int, page_size: int):
    from headkv_sglang.kv.pool import LayerPages

    layers, next_page = [], 0
    for _ in range(rows):
        lengths = torch.randint(0, 90, (H,), generator=gen)
        lengths[torch.rand(H, generator=gen) < 0.25] = 0  # some empty heads
        pages = (lengths + page_size - 1) // page_size
        indptr = torch.zeros(H + 1, dtype=torch.int64)
        torch.cumsum(pages, 0, out=indptr[1:])
        ids = torch.randperm(5000, generator=gen)[: int(pages.sum())] + next_page
        layers.append(LayerPages(kv_indptr=indptr, kv_indices=ids, lengths=lengths))
    return layers


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_plan_tables_are_the_rows_concatenated(page_size):
    """The batched plan against the table written out row by row, fresh random rows."""
    gen = torch.Generator().manual_seed(page_size)
    H = 3
    layers = _random_layers(gen, 7, H, page_size)
    plan = build_decode_plan(layers, page_size)
    indptr, indices, last = [0], [], []
    for lp in layers:
        for h in range(H):
            pages = lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])].tolist()
            indices += pages
            indptr.append(indptr[-1] + len(pages))
            n = int(lp.lengths[h])
            last.append(0 if n == 0 else (n - 1) % page_size + 1)
    assert plan.kv_indptr.tolist() == indptr and plan.kv_indices.tolist() == indices
    assert plan.kv_last_page_len.tolist() == last and plan.num_kv_heads == H


@pytest.mark.parametrize("page_size", [1, 4])
def test_padded_plan_keeps_its_rows_and_adds_empty_ones(page_size):
    gen = torch.Generator().manual_seed(40 + page_size)
    H, G, D = 2, 3, 8
    layers = _random_layers(gen, 5, H, page_size)
    plan = build_decode_plan(layers, page_size)
    k_pages = torch.randn(5100, page_size, D, generator=gen)
    v_pages = torch.randn(5100, page_size, D, generator=gen)
    padded = pad_plan(plan, plan.num_rows + 7)
    assert padded.num_rows == plan.num_rows + 7 and torch.equal(padded.kv_indices, plan.kv_indices)
    q = torch.randn(padded.num_rows, 1, G, D, generator=gen)
    o, lse = ragged_decode_torch(q, k_pages, v_pages, padded, 0.3)
    o0, lse0 = ragged_decode_torch(q[: plan.num_rows], k_pages, v_pages, plan, 0.3)
    torch.testing.assert_close(o[: plan.num_rows], o0)
    torch.testing.assert_close(lse[: plan.num_rows], lse0)
    assert torch.isneginf(lse[plan.num_rows:]).all() and not o[plan.num_rows:].any()
    assert pad_plan(plan, plan.num_rows) is plan
    with pytest.raises(ValueError, match=r"the plan has 10 rows, more than the 9 it is padded to"):
        pad_plan(plan, 9)


@pytest.mark.parametrize("page_size", [1, 3])
def test_empty_rows_get_one_dummy_page_and_the_others_keep_theirs(page_size):
    gen = torch.Generator().manual_seed(70 + page_size)
    plan = pad_plan(build_decode_plan(_random_layers(gen, 6, 2, page_size), page_size), 15)
    indptr, indices, last, empty = fill_empty_rows(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)
    assert empty.tolist() == (plan.lengths == 0).tolist() and bool(empty.any())
    for r in range(plan.num_rows):
        got = indices[int(indptr[r]):int(indptr[r + 1])].tolist()
        if empty[r]:
            assert got == [0] and int(last[r]) == 1
        else:
            assert got == plan.kv_indices[int(plan.kv_indptr[r]):int(plan.kv_indptr[r + 1])].tolist()
            assert int(last[r]) == int(plan.kv_last_page_len[r])
    assert indptr.dtype == plan.kv_indptr.dtype and indices.dtype == plan.kv_indices.dtype
    # all rows empty: only dummies
    _, idx, _, e = fill_empty_rows(torch.zeros(5, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                   torch.zeros(4, dtype=torch.int32))
    assert e.all() and idx.tolist() == [0] * 4


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("chunk_pages", [1, 2, 5])
@pytest.mark.parametrize("pad", [None, 3])
def test_chunked_rows_merge_to_the_unchunked_attention(page_size, chunk_pages, pad):
    """split_rows + kernel per chunk + merge_chunks == attention per row (torch kernel)."""
    from flashinfer_ext.plan import DecodePlan, merge_chunks, split_rows
    from headkv_sglang.reference import flat_to_paged

    gen = torch.Generator().manual_seed(page_size * 100 + chunk_pages * 10 + (pad or 0))
    R, H, G, D = 3, 3, 4, 16
    lengths = torch.randint(1, 90, (R * H,), generator=gen)
    lengths[2] = 0
    lengths[5] = page_size * chunk_pages  # exactly one full chunk
    flat = torch.randn(int(lengths.sum()), 2 * D, generator=gen)
    tok = torch.zeros(R * H + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=tok[1:])
    pages, kv_indptr, kv_indices, last = flat_to_paged(flat, tok, page_size, generator=gen)
    kp, vp = pages[..., :D].contiguous(), pages[..., D:].contiguous()
    plan = DecodePlan(kv_indptr.to(torch.int32), kv_indices.to(torch.int32), last.to(torch.int32), lengths, H,
                      page_size)
    q = torch.randn(R, H, G, D, generator=gen)
    o_ref, lse_ref = ragged_decode_torch(q, kp, vp, plan, 0.3)

    need = int(((lengths + page_size - 1) // page_size + chunk_pages - 1).div(chunk_pages, rounding_mode="floor").sum())
    cp = split_rows(plan, chunk_pages, pad_to=None if pad is None else need + pad)
    assert cp.num_chunks == need + (pad or 0)
    assert ((cp.kv_indptr[1:] - cp.kv_indptr[:-1]) <= chunk_pages).all()
    assert ((cp.kv_last_page_len >= 1) & (cp.kv_last_page_len <= page_size)).all()
    chunk_plan = DecodePlan(cp.kv_indptr, cp.kv_indices, cp.kv_last_page_len, torch.zeros(cp.num_chunks), 1,
                            page_size)
    q_c = q.reshape(R * H, G, D)[cp.q_index].reshape(cp.num_chunks, 1, G, D)
    o_c, lse_c = ragged_decode_torch(q_c, kp, vp, chunk_plan, 0.3)
    o, lse = merge_chunks(o_c.reshape(-1, G, D), lse_c.reshape(-1, G), cp.chunk_row, R * H)
    torch.testing.assert_close(o.view(R, H, G, D), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.view(R, H, G), lse_ref, atol=1e-5, rtol=1e-5)


def test_split_rows_refuses_more_chunks_than_padded_for():
    from flashinfer_ext.plan import DecodePlan, split_rows

    plan = DecodePlan(torch.tensor([0, 5, 6], dtype=torch.int32), torch.arange(6, dtype=torch.int32),
                      torch.tensor([16, 3], dtype=torch.int32), torch.tensor([80, 3]), 2, 16)
    with pytest.raises(ValueError, match=r"the rows need 4 chunks of 2 pages, more than the 3 this plan is padded to"):
        split_rows(plan, 2, pad_to=3)
