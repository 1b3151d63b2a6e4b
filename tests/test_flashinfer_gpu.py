"""flashinfer_ext on the GPU, against the torch reference on fresh random inputs.

FlashInfer ragged decode (one ``num_kv_heads=1`` row per (request, KV head)), the dense
decode tail merged with it, CUDA-graph replay after a re-plan, and compression run on
the device. bf16 storage, fp32 reference over the same bf16 values; outputs poisoned
(NaN) before every run; odd lengths, empty rows, unused page slots filled with large
values that would show if a kernel read them.

Skipped, with the reason in pytest's summary, on a machine without a CUDA device or
without flashinfer-python: the CPU CI has none. ``scripts/gpu_check.sh`` runs them on an
H100/H200 (results in ``benchmarks/results/kernels_h200.md``).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from ragged_oracle import kernel_attend

from flashinfer_ext.plan import DecodePlan, ragged_decode_torch
from headkv_sglang.reference import attend, flat_to_paged


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine (run scripts/gpu_check.sh on an H100/H200)"
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer-python is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

D = 128  # one FlashInfer JIT module (bf16, head_dim 128) serves every test
DT = torch.bfloat16
ATOL, RTOL = 1e-2, 2e-2
GARBAGE = 1e4  # in page slots past a row's length


def paged_rows(lengths: list[int], page_size: int, gen: torch.Generator, spare_pages: int = 3):
    """Random K/V rows in a paged pool (pages in random order, some unused)."""
    n = sum(lengths)
    flat = torch.randn(n, 2 * D, generator=gen)
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths), 0, out=indptr[1:])
    pages, kv_indptr, kv_indices, last = flat_to_paged(flat, indptr, page_size, generator=gen)
    # unused slots of each row's last page, and spare pages nobody owns, hold garbage
    for r, ln in enumerate(lengths):
        if ln and last[r] < page_size:
            pages[kv_indices[kv_indptr[r + 1] - 1], last[r]:] = GARBAGE
    pages = torch.cat([pages, torch.full((spare_pages, page_size, 2 * D), GARBAGE)])
    pages = pages.to(DT)
    plan = DecodePlan(kv_indptr.to(torch.int32), kv_indices.to(torch.int32), last.to(torch.int32),
                      torch.tensor(lengths, dtype=torch.int64), 0, page_size)
    return pages[..., :D].contiguous(), pages[..., D:].contiguous(), plan


def with_heads(plan: DecodePlan, num_kv_heads: int) -> DecodePlan:
    return DecodePlan(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, plan.lengths, num_kv_heads,
                      plan.page_size)


def poison(rd) -> None:
    rd._out.fill_(float("nan"))
    rd._lse.fill_(float("nan"))


@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("chunk_pages", [0, 3])
def test_ragged_decode_matches_reference(page_size, group, chunk_pages):
    from flashinfer_ext.decode import RaggedDecode

    gen = torch.Generator().manual_seed(1000 * page_size + 10 * group + chunk_pages)
    R, H = 5, 3
    lengths = torch.randint(1, 700, (R * H,), generator=gen).tolist()
    lengths[4] = 0  # an empty row
    lengths[7] = page_size  # exactly one full page
    kp, vp, plan = paged_rows(lengths, page_size, gen)
    plan = with_heads(plan, H)
    q = torch.randn(R, H, group, D, generator=gen).to(DT)
    scale = 1 / math.sqrt(D)
    o_ref, lse_ref = ragged_decode_torch(q.float(), kp.float(), vp.float(), plan, scale)

    rd = RaggedDecode("cuda", chunk_pages=chunk_pages)
    rd.plan(plan, group, D, DT, scale)
    poison(rd)
    o, lse = rd.run(q.cuda(), kp.cuda(), vp.cuda())
    assert o.shape == (R, H, group, D) and lse.shape == (R, H, group)
    torch.testing.assert_close(o.float().cpu(), o_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.cpu(), lse_ref, atol=ATOL, rtol=RTOL)
    empty = torch.tensor(lengths).view(R, H) == 0
    assert torch.isneginf(lse.cpu()[empty]).all() and (o.cpu()[empty] == 0).all()


def test_dense_tail_merged_with_ragged_prompt_is_attention_over_the_union():
    from flashinfer_ext.decode import DenseDecode, RaggedDecode, merge

    gen = torch.Generator().manual_seed(7)
    R, H, G, P = 4, 4, 4, 16
    Hq = H * G
    scale = 1 / math.sqrt(D)
    prompt_lengths = torch.randint(1, 400, (R * H,), generator=gen).tolist()
    kp, vp, plan = paged_rows(prompt_lengths, P, gen)
    plan = with_heads(plan, H)
    # decode tail: SGLang's token pool [slots, 1, H, D] (page size 1), random slots per request
    tail_lengths = torch.randint(1, 41, (R,), generator=gen).tolist()
    slots = torch.randperm(sum(tail_lengths) + 11, generator=gen)
    pool_k = torch.randn(slots.numel(), 1, H, D, generator=gen).to(DT)
    pool_v = torch.randn(slots.numel(), 1, H, D, generator=gen).to(DT)
    t_indptr = torch.zeros(R + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(tail_lengths), 0, out=t_indptr[1:])
    t_indices = slots[: sum(tail_lengths)]
    q = torch.randn(R, Hq, D, generator=gen).to(DT)

    rd, dd = RaggedDecode("cuda"), DenseDecode("cuda")
    rd.plan(plan, G, D, DT, scale)
    dd.plan(t_indptr, t_indices, torch.ones(R, dtype=torch.int64), Hq, H, D, 1, DT, scale)
    poison(rd)
    poison(dd)
    o_p, lse_p = rd.run(q.view(R, H, G, D).cuda(), kp.cuda(), vp.cuda())
    o_t, lse_t = dd.run(q.cuda(), pool_k.cuda(), pool_v.cuda())
    o, lse = merge(o_p, lse_p, o_t, lse_t)

    from headkv_sglang.reference import paged_to_flat

    flat_k, tok = paged_to_flat(kp.float(), plan.kv_indptr.long(), plan.kv_indices.long(), plan.kv_last_page_len.long())
    flat_v, _ = paged_to_flat(vp.float(), plan.kv_indptr.long(), plan.kv_indices.long(), plan.kv_last_page_len.long())
    for r in range(R):
        tail = t_indices[t_indptr[r]:t_indptr[r + 1]]
        for h in range(H):
            row = r * H + h
            k = torch.cat([flat_k[tok[row]:tok[row + 1]], pool_k[tail, 0, h].float()])
            v = torch.cat([flat_v[tok[row]:tok[row + 1]], pool_v[tail, 0, h].float()])
            o_ref, lse_ref = attend(q[r, h * G:(h + 1) * G].float(), k, v, scale)
            torch.testing.assert_close(o[r, h * G:(h + 1) * G].cpu(), o_ref, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(lse[r, h * G:(h + 1) * G].cpu(), lse_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_pages", [0, 4])
def test_cuda_graph_replays_correctly_after_a_new_plan(chunk_pages):
    from flashinfer_ext.decode import RaggedDecode

    gen = torch.Generator().manual_seed(11 + chunk_pages)
    R, H, G, P = 6, 2, 4, 16
    scale = 1 / math.sqrt(D)
    max_pages = R * H * 60  # 900 tokens -> 57 pages per row
    k_pool = torch.full((max_pages, P, D), GARBAGE, dtype=DT, device="cuda")
    v_pool = torch.full((max_pages, P, D), GARBAGE, dtype=DT, device="cuda")

    def load(lengths):
        kp, vp, plan = paged_rows(lengths, P, gen, spare_pages=0)
        k_pool[: kp.shape[0]] = kp.cuda()
        v_pool[: vp.shape[0]] = vp.cuda()
        return with_heads(plan, H)

    rd = RaggedDecode("cuda", cuda_graph=True, max_rows=R * H, max_pages=max_pages, chunk_pages=chunk_pages,
                      max_chunks=R * H * 15)  # 57 pages -> 15 chunks of 4 at most
    plan_a = load(torch.randint(1, 900, (R * H,), generator=gen).tolist())
    rd.plan(plan_a, G, D, DT, scale)
    q_static = torch.randn(R, H, G, D, generator=gen).to(DT).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rd.run(q_static, k_pool, v_pool)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_s, lse_s = rd.run(q_static, k_pool, v_pool)

    for step in range(3):  # new lengths (one empty row), pages and queries each step; same graph
        lengths = torch.randint(1, 900, (R * H,), generator=gen).tolist()
        lengths[step] = 0
        plan_b = load(lengths)
        rd.plan(plan_b, G, D, DT, scale)
        q = torch.randn(R, H, G, D, generator=gen).to(DT)
        q_static.copy_(q.cuda())
        o_s.fill_(float("nan"))
        lse_s.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        used = int(plan_b.kv_indices.max()) + 1
        o_ref, lse_ref = ragged_decode_torch(q.float(), k_pool[:used].float().cpu(), v_pool[:used].float().cpu(),
                                             plan_b, scale)
        torch.testing.assert_close(o_s.float().cpu(), o_ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse_s.cpu(), lse_ref, atol=ATOL, rtol=RTOL)


def test_graphed_wrapper_rejects_a_plan_of_another_size():
    from flashinfer_ext.decode import RaggedDecode

    gen = torch.Generator().manual_seed(3)
    _, _, plan = paged_rows([5, 9, 3, 1], 16, gen)
    rd = RaggedDecode("cuda", cuda_graph=True, max_rows=6, max_pages=32)
    with pytest.raises(ValueError, match=r"a graphed wrapper plans exactly 6 rows and at most 32 pages, got 4 rows"):
        rd.plan(with_heads(plan, 2), 4, D, DT, 1.0)


@pytest.mark.parametrize("policy", ["snapkv", "adakv", "pyramidkv", "streamingllm"])
def test_compression_on_the_gpu_keeps_what_the_cpu_keeps(policy):
    from headkv_sglang.kv.manager import CompressionManager
    from headkv_sglang.config import KVPolicyConfig, ModelShape

    gen = torch.Generator().manual_seed(sum(map(ord, policy)))
    Lyr, H, G, Dh, P, T = 3, 2, 4, 64, 16, 1237
    shape = ModelShape(num_layers=Lyr, num_q_heads=H * G, num_kv_heads=H, head_dim=Dh)
    # kernel_size 1: no pooling, so random scores have no ties for top-k to break differently
    cfg = KVPolicyConfig(policy=policy, budget=97, window=8, kernel_size=1)
    k = torch.randn(Lyr, T, H, Dh, generator=gen)
    v = torch.randn(Lyr, T, H, Dh, generator=gen)
    q = torch.randn(Lyr, T, H * G, Dh, generator=gen)
    q_dec = torch.randn(1, H * G, Dh, generator=gen)
    outs = {}
    for dev in ("cpu", "cuda"):
        mgr = CompressionManager(shape, num_pages=2048, page_size=P, dtype=torch.float32, device=dev, only_if_smaller=False)
        mgr.begin_extend(0, "r", window=8)
        for layer in range(Lyr):
            mgr.capture_queries(layer, 0, q[layer].to(dev))
        rec = mgr.compress(0, cfg, T, lambda l: (k[l].to(dev), v[l].to(dev)))
        outs[dev] = (
            [lp.lengths.cpu() for lp in rec.layers],
            [kernel_attend(mgr, layer, 0, q_dec.to(dev), torch.zeros(0, H, Dh, device=dev),
                        torch.zeros(0, H, Dh, device=dev), torch.tensor([T]), 1 / math.sqrt(Dh)).cpu()
             for layer in range(Lyr)],
        )
        mgr.check_integrity()
    for layer in range(Lyr):
        assert torch.equal(outs["cpu"][0][layer], outs["cuda"][0][layer])
        torch.testing.assert_close(outs["cuda"][1][layer], outs["cpu"][1][layer], atol=1e-4, rtol=1e-4)
