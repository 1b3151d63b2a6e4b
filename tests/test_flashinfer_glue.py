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

from headkv_sglang.kv.pool import RaggedHeadKVPool
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

D = 16


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    import flashinfer_ext.decode as decode

    monkeypatch.setattr(decode, "_flashinfer", fake_flashinfer.module)


def batches(pool, L, H, gen, req_to_token, slots_total):
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
        out.append(rows_for_queries(records, req_to_token, idxs, [rec.prompt_len for rec in records], seq_lens))
    return out


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("page_size", [1, 5])
def test_glue_matches_the_torch_kernel(graph, page_size):
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
    fi = FlashInferRaggedAttention(pool, L, H, H * G, 0.25, workspace_bytes=8, **kw)
    ref = TorchRaggedAttention(pool, L, H)
    first, second = batches(pool, L, H, gen, req_to_token, slots_total)
    assert any(lp.comp_count is not None for rec in first.records for lp in rec.layers)
    for rows in (first, second, first):
        fi.plan(rows)
        ref.plan(rows)
        n = rows.num_rows
        for layer in range(L):
            q = torch.randn(6 if graph else n, H * G, D, generator=gen)
            got = fi.run(layer, q, k_buf, v_buf, 0.25)
            assert got.shape == q.shape
            torch.testing.assert_close(got[:n], ref.run(layer, q[:n], k_buf, v_buf, 0.25), atol=1e-5, rtol=1e-5)


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
