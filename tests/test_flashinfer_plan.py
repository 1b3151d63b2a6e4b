"""flashinfer_ext's decode plan (CPU part): CSR rows per (request, KV head) over real pool pages."""

from __future__ import annotations

import math

import pytest
import torch

from flashinfer_ext.plan import build_decode_plan, ragged_decode_torch
from headkv_sglang.compression import CompressionManager
from headkv_sglang.config import KVPolicyConfig, ModelShape


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_plan_over_compressed_pages_matches_manager_attention(page_size, group):
    torch.manual_seed(page_size * 10 + group)
    H, D, Lyr = 2, 8, 2
    shape = ModelShape(num_layers=Lyr, num_q_heads=H * group, num_kv_heads=H, head_dim=D)
    mgr = CompressionManager(shape, num_pages=4096, page_size=page_size, dtype=torch.float32, device="cpu")
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
            ref = mgr.attend(layer, r, qd[r].reshape(1, H * group, D), torch.zeros(0, H, D), torch.zeros(0, H, D),
                             torch.tensor([T]), scale)
            torch.testing.assert_close(o[r].reshape(H * group, D), ref[0], atol=1e-5, rtol=1e-5)
    mgr.check_integrity()


def test_plan_rejects_inconsistent_tables():
    from headkv_sglang.pool import LayerPages

    lp = LayerPages(kv_indptr=torch.tensor([0, 1, 2]), kv_indices=torch.tensor([4, 5]), lengths=torch.tensor([3, 20]))
    with pytest.raises(ValueError, match=r"pages per row \[1, 1\] do not hold lengths \[3, 20\] at page_size 16"):
        build_decode_plan([lp], 16)
