"""FlashInferRaggedAttention (GPU) against the batched torch kernel and the naive oracle.

SGLang-shaped inputs: a bf16 token pool ``[slots, Hkv, D]`` holding the tails (page size 1,
slots shuffled), ragged prompt rows in the compressed pool (pages in random order, some
heads empty), Razor compensation on some rows, GQA groups 4 and 8, page sizes 1 and 16,
and re-plans (other requests, then the first ones again, then one more decode step); the
graphed kernel captured once and replayed after each of those re-plans.
Skipped on a machine without CUDA + flashinfer (the CPU CI); ``scripts/gpu_check.sh``
runs it on an H100/H200.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ragged_oracle import oracle_row, random_request

from headkv_sglang.kv.pool import RaggedHeadKVPool
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flashinfer") is None,
    reason="no CUDA device with flashinfer on this machine (scripts/gpu_check.sh runs it on an H100/H200)")

D, DT = 128, torch.bfloat16


def batch(pool, free, L, H, R, gen, slots_total, max_ctx, req_to_token):
    records, idxs, seq_lens = [], [], []
    perm = torch.randperm(slots_total, generator=gen)
    for r in range(R):
        prompt_len = int(torch.randint(1, 700, (1,), generator=gen))
        tail = int(torch.randint(1, 60, (1,), generator=gen))
        req_to_token[r, prompt_len:prompt_len + tail] = perm[r * 64:r * 64 + tail].to(req_to_token)
        records.append(random_request(pool, free, L, H, prompt_len, gen, comp=r % 3 == 1))
        idxs.append(r)
        seq_lens.append(prompt_len + tail)
    return records, idxs, seq_lens


@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_kernel_matches_torch_kernel_and_oracle(group, page_size):
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    gen = torch.Generator().manual_seed(10 * group + page_size)
    L, H, R = 3, 2, 7
    num_pages = 60000 // page_size + 400
    pool = RaggedHeadKVPool(num_pages, page_size, D, DT, "cuda")
    pool.k_pages.normal_()
    pool.v_pages.normal_()
    free = torch.randperm(num_pages, generator=gen).tolist()
    slots_total, max_ctx = 64 * R + 5, 800
    k_buf = torch.randn(slots_total, H, D, device="cuda").to(DT)
    v_buf = torch.randn(slots_total, H, D, device="cuda").to(DT)
    req_to_token = torch.zeros(R, max_ctx, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    fi = FlashInferRaggedAttention(pool, L, H, H * group, scale)
    ref = TorchRaggedAttention(pool, L, H)
    first = batch(pool, free, L, H, R, gen, slots_total, max_ctx, req_to_token)
    second = batch(pool, free, L, H, R - 3, gen, slots_total, max_ctx, req_to_token)
    for n, (records, idxs, seq_lens) in enumerate([first, second, first]):
        if n == 2:  # the next decode step of the first batch: tails one token longer
            seq_lens = [s + 1 for s in seq_lens]
            for r, s in zip(idxs, seq_lens):
                req_to_token[r, s - 1] = (r * 64 + 63) % slots_total
        rows = rows_for_queries(records, req_to_token, idxs, [rec.prompt_len for rec in records], seq_lens)
        fi.plan(rows)
        ref.plan(rows)
        for layer in range(L):
            q = torch.randn(len(records), H * group, D, device="cuda").to(DT)
            got = fi.run(layer, q, k_buf, v_buf, scale)
            assert got.dtype == DT and got.shape == q.shape
            want = ref.run(layer, q, k_buf, v_buf, scale)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=3e-2)
            for i in (0, len(records) - 1):  # and the oracle, for two rows
                tail = req_to_token[idxs[i], records[i].prompt_len:seq_lens[i]].long()
                o = oracle_row(pool, records[i].layers[layer], q[i].float(), k_buf[tail].float(),
                               v_buf[tail].float(), scale)
                torch.testing.assert_close(got[i].float().cpu(), o, atol=2e-2, rtol=3e-2)


@pytest.mark.parametrize("group", [4, 8])
def test_graphed_kernel_replays_after_replans(group):
    """Capture every layer's run in one CUDA graph, then re-plan (fewer rows, other records,
    Razor rows, one more decode step) and replay: each replay equals the torch kernel."""
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    gen = torch.Generator().manual_seed(90 + group)
    L, H, R, ps = 3, 2, 7, 16
    num_pages = 60000 // ps + 400
    pool = RaggedHeadKVPool(num_pages, ps, D, DT, "cuda")
    pool.k_pages.normal_()
    pool.v_pages.normal_()
    free = torch.randperm(num_pages, generator=gen).tolist()
    slots_total, max_ctx = 64 * R + 5, 800
    k_buf = torch.randn(slots_total, H, D, device="cuda").to(DT)
    v_buf = torch.randn(slots_total, H, D, device="cuda").to(DT)
    req_to_token = torch.zeros(R, max_ctx, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    fi = FlashInferRaggedAttention(pool, L, H, H * group, scale, cuda_graph=True, max_rows=R,
                                   max_pages=R * H * (700 // ps + 1), max_tail=R * 64)
    ref = TorchRaggedAttention(pool, L, H)
    first = batch(pool, free, L, H, R, gen, slots_total, max_ctx, req_to_token)
    second = batch(pool, free, L, H, R - 3, gen, slots_total, max_ctx, req_to_token)
    plans = []
    for n, (records, idxs, seq_lens) in enumerate([first, second, first]):
        if n == 2:  # the next decode step of the first batch
            seq_lens = [s + 1 for s in seq_lens]
            for r, s in zip(idxs, seq_lens):
                req_to_token[r, s - 1] = (r * 64 + 63) % slots_total
        plans.append(rows_for_queries(records, req_to_token, idxs, [rec.prompt_len for rec in records], seq_lens))
    assert any(lp.comp_count is not None for rec in second[0] for lp in rec.layers), "no Razor row"

    q_static = torch.randn(R, L, H * group, D, device="cuda").to(DT)
    fi.plan(plans[1])  # capture on the smaller batch: later plans change the rows the graph reads
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(L):
            fi.run(layer, q_static[:, layer], k_buf, v_buf, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fi.run(layer, q_static[:, layer], k_buf, v_buf, scale) for layer in range(L)]
    for rows in [plans[0], plans[1], plans[2], plans[1]]:
        fi.plan(rows)
        ref.plan(rows)
        q_static.copy_(torch.randn(R, L, H * group, D, device="cuda").to(DT))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        n = rows.num_rows
        for layer in range(L):
            want = ref.run(layer, q_static[:n, layer], k_buf, v_buf, scale)
            torch.testing.assert_close(outs[layer][:n].float(), want.float(), atol=2e-2, rtol=3e-2)
    with pytest.raises(ValueError, match=r"graphed kernel runs q of \[max_rows=7"):
        fi.run(0, q_static[:3, 0], k_buf, v_buf, scale)


def shared_case(page_size: int, group: int, device: str, dtype: torch.dtype) -> None:
    """FlashInfer over pages inside SGLang's token slots (``--kv-memory shared``): the tails in
    the same buffers, vs the torch kernel over the same pages in the separate pool (which the
    CPU tests prove equal to the torch kernel over the shared buffers). Runs on the CPU with
    FlashInfer's stand-in too (``tests/test_flashinfer_glue.py``)."""
    from flashinfer_ext.ragged import FlashInferRaggedAttention
    from headkv_sglang.kv.shared_memory import BorrowingPageAllocator, SharedPagePool, SlotGeometry, layer_buffers
    from test_shared_memory import FakeTokenAllocator, _shared_copy

    gen = torch.Generator().manual_seed(page_size + group)
    L, H, R = 3, 2, 7
    num_pages = 60000 // page_size + 400
    split = RaggedHeadKVPool(num_pages, page_size, D, dtype, device)
    split.k_pages.normal_()
    split.v_pages.normal_()
    free = torch.randperm(num_pages, generator=gen).tolist()
    size = 12000  # token slots: the pages' (6 head-vectors a slot) and the tails'
    src = FakeTokenAllocator(size, seed=page_size)
    geo = SlotGeometry.smallest(L, H, page_size, rows=size + 1)
    alloc = BorrowingPageAllocator(src, geo, max_chunks=size // geo.chunk_slots)
    k_all, v_all, _, _ = layer_buffers(L, size + 1, H, D, dtype, device)
    k_all.normal_()
    v_all.normal_()
    pool = SharedPagePool(k_all, v_all, alloc)
    req_to_token = torch.zeros(R, 800, dtype=torch.int32, device=device)
    records, idxs, seq_lens = [], [], []
    for r in range(R):
        prompt_len = int(torch.randint(1, 700, (1,), generator=gen))
        seq_len = prompt_len + int(torch.randint(1, 60, (1,), generator=gen))
        req_to_token[r, :seq_len] = src.alloc(seq_len).to(req_to_token)  # SGLang's slots in the same buffers
        records.append(random_request(split, free, L, H, prompt_len, gen, comp=r % 3 == 1))
        idxs.append(r)
        seq_lens.append(seq_len)
    moved = _shared_copy(split, records, alloc, pool)
    alloc.check_integrity({"copy": [p for rec in moved for p in rec.page_ids]})
    scale = D ** -0.5
    fi = FlashInferRaggedAttention(pool, L, H, H * group, scale)
    ref = TorchRaggedAttention(split, L, H)
    starts = [rec.prompt_len for rec in records]
    fi.plan(rows_for_queries(moved, req_to_token, idxs, starts, seq_lens))
    ref.plan(rows_for_queries(records, req_to_token, idxs, starts, seq_lens))
    for layer in range(L):
        q = torch.randn(R, H * group, D, device=device).to(dtype)
        got = fi.run(layer, q, k_all[layer], v_all[layer], scale)
        want = ref.run(layer, q, k_all[layer], v_all[layer], scale)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=3e-2)


@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_kernel_reads_pages_inside_token_slots(page_size):
    shared_case(page_size, 4, "cuda", DT)


def test_flashinfer_kernel_rejects_a_scale_it_was_not_planned_for():
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    gen = torch.Generator().manual_seed(0)
    pool = RaggedHeadKVPool(64, 16, D, DT, "cuda")
    fi = FlashInferRaggedAttention(pool, 1, 1, 4, D ** -0.5)
    rec = random_request(pool, list(range(64)), 1, 1, 20, gen, comp=False)
    req_to_token = torch.arange(40, dtype=torch.int32, device="cuda").view(1, 40)
    fi.plan(rows_for_queries([rec], req_to_token, [0], [20], [22]))
    kv = torch.zeros(40, 1, D, dtype=DT, device="cuda")
    with pytest.raises(ValueError, match="the plan was made for"):
        fi.run(0, torch.zeros(1, 4, D, dtype=DT, device="cuda"), kv, kv, 0.5)
