"""RaggedAttention's batched torch kernel against the naive per-row reference.

Fresh random pools with odd sizes: prompt rows of different lengths per (layer, KV head)
(some empty), pages in random order, tails in a shuffled SGLang-style token pool, rows of
an extend batch that see only part of the tail, Razor compensation on some rows, and GQA
groups 1, 3 and 4. The oracle (tests/ragged_oracle.py) is :func:`headkv_sglang.reference.attend`
+ :func:`~headkv_sglang.reference.merge_states`, one (row, KV head) at a time.
"""

from __future__ import annotations

import pytest
import torch

from headkv_sglang.kv.pool import RaggedHeadKVPool, RequestPages
from headkv_sglang.kv.ragged import RaggedRows, TorchRaggedAttention, rows_for_queries
from ragged_oracle import oracle_row, random_request

D = 24  # head_dim


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("extend", [False, True])
def test_torch_kernel_matches_reference(group, page_size, extend):
    gen = torch.Generator().manual_seed(100 * group + page_size + 7 * extend)
    L, H, R = 3, 3, 5
    pool = RaggedHeadKVPool(4000, page_size, D, torch.float32, "cpu")
    pool.k_pages.normal_(generator=gen)
    pool.v_pages.normal_(generator=gen)
    free = torch.randperm(4000, generator=gen).tolist()
    slots_total = 600
    k_buf = torch.randn(slots_total, H, D, generator=gen)
    v_buf = torch.randn(slots_total, H, D, generator=gen)
    max_ctx = 200
    req_to_token = torch.zeros(R, max_ctx, dtype=torch.int32)
    perm = torch.randperm(slots_total, generator=gen)
    records, idxs, starts, ends = [], [], [], []
    for r in range(R):
        prompt_len = int(torch.randint(1, 97, (1,), generator=gen))
        seq_len = prompt_len + int(torch.randint(1, 40, (1,), generator=gen))
        req_to_token[r, :seq_len] = perm[r * 110:r * 110 + seq_len].to(torch.int32)
        rec = random_request(pool, free, L, H, prompt_len, gen, comp=r % 2 == 1)
        # extend: several queries of one request, each sees the tail up to itself
        positions = range(max(prompt_len, seq_len - 3), seq_len) if extend else [seq_len - 1]
        for pos in positions:
            records.append(rec)
            idxs.append(r)
            starts.append(prompt_len)
            ends.append(pos + 1)
    rows = rows_for_queries(records, req_to_token, idxs, starts, ends)
    kernel = TorchRaggedAttention(pool, L, H)
    kernel.plan(rows)
    scale = D ** -0.5
    for layer in range(L):
        q = torch.randn(rows.num_rows, H * group, D, generator=gen)
        got = kernel.run(layer, q, k_buf, v_buf, scale)
        for i, rec in enumerate(records):
            slots = req_to_token[idxs[i], starts[i]:ends[i]].long()
            want = oracle_row(pool, rec.layers[layer], q[i], k_buf[slots], v_buf[slots], scale)
            torch.testing.assert_close(got[i], want, atol=2e-5, rtol=2e-5)


def test_plan_keeps_the_prompt_tables_while_the_records_stay():
    gen = torch.Generator().manual_seed(3)
    pool = RaggedHeadKVPool(64, 4, D, torch.float32, "cpu")
    free = list(range(64))
    recs = [random_request(pool, free, 2, 2, 9, gen, comp=False) for _ in range(2)]
    req_to_token = torch.arange(40, dtype=torch.int32).view(2, 20)
    kernel = TorchRaggedAttention(pool, 2, 2)
    kernel.plan(rows_for_queries(recs, req_to_token, [0, 1], [9, 9], [10, 11]))
    tables = kernel._layers
    kernel.plan(rows_for_queries(recs, req_to_token, [0, 1], [9, 9], [11, 12]))  # the next step
    assert kernel._layers is tables
    kernel.plan(rows_for_queries(recs[:1], req_to_token, [0], [9], [12]))  # a request left
    assert kernel._layers is not tables


def test_bad_inputs_name_the_problem():
    pool = RaggedHeadKVPool(8, 4, D, torch.float32, "cpu")
    kernel = TorchRaggedAttention(pool, 2, 2)
    with pytest.raises(RuntimeError, match="before plan"):
        kernel.run(0, torch.zeros(1, 2, D), torch.zeros(4, 2, D), torch.zeros(4, 2, D), 1.0)
    with pytest.raises(ValueError, match="tail_indptr must be"):
        RaggedRows([], torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ends before its prompt"):
        rows_for_queries([RequestPages(5, "x", 1)], torch.zeros(1, 8, dtype=torch.int32), [0], [5], [4])
