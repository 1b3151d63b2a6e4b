"""The naive oracle for a compressed row: one KV head at a time, states merged by log-sum-exp.

Built only from :func:`headkv_sglang.reference.attend` and
:func:`~headkv_sglang.reference.merge_states`; shared by the kernel and backend tests.
"""

from __future__ import annotations

import math

import torch

from headkv_sglang.kv.pool import LayerPages, RaggedHeadKVPool, RequestPages
from headkv_sglang.reference import attend, merge_states


def oracle_row(pool: RaggedHeadKVPool, lp: LayerPages, q: torch.Tensor, k_tail: torch.Tensor,
               v_tail: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 ``[Hq, D]``: ``q`` ``[Hq, D]`` over the row's pages ⊕ ``k_tail``/``v_tail``
    ``[m, Hkv, D]`` ⊕ its compensation state (logit ``+ log count``)."""
    H = lp.lengths.numel()
    Hq, D = q.shape
    G = Hq // H
    out = torch.zeros(Hq, D)
    k_pages, v_pages = pool.k_pages.cpu(), pool.v_pages.cpu()
    for h in range(H):
        pages = lp.kv_indices[lp.kv_indptr[h]:lp.kv_indptr[h + 1]]
        n = int(lp.lengths[h])
        kp = k_pages[pages].reshape(-1, D)[:n]
        vp = v_pages[pages].reshape(-1, D)[:n]
        qh = q[h * G:(h + 1) * G].cpu()
        o, lse = attend(qh, kp, vp, scale)
        o2, lse2 = attend(qh, k_tail[:, h].cpu(), v_tail[:, h].cpu(), scale)
        o, lse = merge_states(o, lse, o2, lse2)
        if lp.comp_count is not None and int(lp.comp_count[h]) > 0:
            bias = torch.tensor([math.log(int(lp.comp_count[h]))])
            o3, lse3 = attend(qh, lp.comp_k[h:h + 1].cpu(), lp.comp_v[h:h + 1].cpu(), scale, bias)
            o, lse = merge_states(o, lse, o3, lse3)
        out[h * G:(h + 1) * G] = o
    return out


def random_request(pool: RaggedHeadKVPool, free: list[int], num_layers: int, H: int, prompt_len: int,
                   gen: torch.Generator, comp: bool) -> RequestPages:
    """A compressed request whose rows hold random tokens (lengths 0..prompt_len) in random pages."""
    ps = pool.page_size
    rec = RequestPages(prompt_len=prompt_len, policy="test", budget=0)
    for _ in range(num_layers):
        lengths = torch.randint(0, prompt_len + 1, (H,), generator=gen)
        lengths[0] = max(int(lengths[0]), 1)
        pages = (lengths + ps - 1) // ps
        indptr = torch.zeros(H + 1, dtype=torch.int64)
        torch.cumsum(pages, 0, out=indptr[1:])
        ids = [free.pop() for _ in range(int(pages.sum()))]
        rec.page_ids += ids
        lp = LayerPages(kv_indptr=indptr, kv_indices=torch.tensor(ids, dtype=torch.int64), lengths=lengths)
        if comp:
            lp.comp_k = torch.randn(H, pool.head_dim, generator=gen).to(pool.k_pages)
            lp.comp_v = torch.randn(H, pool.head_dim, generator=gen).to(pool.k_pages)
            lp.comp_count = torch.randint(0, 40, (H,), generator=gen)
            lp.comp_count[0] = 0  # a head that dropped nothing
        lp._page_size = ps
        rec.layers.append(lp)
    return rec


def kernel_attend(mgr, layer: int, idx: int, q: torch.Tensor, k_tail: torch.Tensor, v_tail: torch.Tensor,
                  q_pos, scale: float) -> torch.Tensor:
    """The serving kernel (:class:`~headkv_sglang.kv.ragged.TorchRaggedAttention`) for one request.

    ``q`` ``[n, Hq, D]`` at absolute positions ``q_pos``; ``k_tail``/``v_tail`` ``[m, Hkv, D]``
    are positions ``prompt_len ..`` (laid into a token pool of their own); a query sees the
    tail up to its own position.
    """
    from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

    rec = mgr.records[idx]
    m, n = k_tail.shape[0], q.shape[0]
    H = mgr.shape.num_kv_heads
    req_to_token = torch.zeros(1, rec.prompt_len + m + 1, dtype=torch.int32)
    req_to_token[0, rec.prompt_len:rec.prompt_len + m] = torch.arange(m, dtype=torch.int32)
    k_buf = k_tail if m else k_tail.new_zeros(1, H, k_tail.shape[-1])
    v_buf = v_tail if m else v_tail.new_zeros(1, H, v_tail.shape[-1])
    ends = [min(int(p) + 1, rec.prompt_len + m) for p in q_pos]  # the tail holds m positions
    rows = rows_for_queries([rec] * n, req_to_token, [0] * n, [rec.prompt_len] * n, ends)
    kernel = TorchRaggedAttention(mgr.pool, len(rec.layers), H)
    kernel.plan(rows)
    return kernel.run(layer, q.to(k_buf.device), k_buf.to(mgr.pool.k_pages.device),
                      v_buf.to(mgr.pool.k_pages.device), scale)
