"""Decode plans for the ragged per-head pool, in FlashInfer's paged-KV CSR terms.

Each (request, KV head) becomes one row of a FlashInfer paged batch with
``num_kv_heads=1`` whose query is that head's group of ``G = Hq / Hkv`` query heads
(the maintainers' recipe for per-head ragged caches, FlashInfer issue #886):

* ``kv_indptr``  int32 ``[R*Hkv + 1]`` — row r*Hkv+h owns pages ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``
* ``kv_indices`` int32 ``[total_pages]`` — page ids into the pool's ``[num_pages, page_size, head_dim]`` K/V
* ``kv_last_page_len`` int32 ``[R*Hkv]`` — tokens on each row's last page (1..page_size; 0 for an empty row)

Built once per decode step per layer on the CPU and copied to the device; the GPU
kernel runs per layer. Pure torch; the FlashInfer call itself lives in ``decode.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodePlan:
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    lengths: torch.Tensor  # int64 [rows] tokens per row
    num_kv_heads: int
    page_size: int

    @property
    def num_rows(self) -> int:
        return self.lengths.numel()

    def to(self, device) -> "DecodePlan":
        return DecodePlan(self.kv_indptr.to(device), self.kv_indices.to(device), self.kv_last_page_len.to(device),
                          self.lengths, self.num_kv_heads, self.page_size)


def build_decode_plan(layers, page_size: int) -> DecodePlan:
    """Plan one layer of a decode batch.

    Parameters
    ----------
    layers : sequence of ``headkv_sglang.pool.LayerPages``
        One per request, in batch order: ``kv_indptr`` int64 ``[H+1]`` over ``kv_indices``
        int64 and ``lengths`` int64 ``[H]``.
    page_size : int
        Tokens per page of the pool.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    if not layers:
        raise ValueError("a decode plan needs at least one request")
    H = layers[0].lengths.numel()
    counts, indices, lengths = [], [], []
    for r, lp in enumerate(layers):
        if lp.lengths.numel() != H:
            raise ValueError(f"request {r} has {lp.lengths.numel()} KV heads, request 0 has {H}")
        c = lp.kv_indptr[1:] - lp.kv_indptr[:-1]
        need = (lp.lengths + page_size - 1) // page_size
        if not torch.equal(c, need):
            raise ValueError(f"request {r}: pages per row {c.tolist()} do not hold lengths {lp.lengths.tolist()} "
                             f"at page_size {page_size}")
        counts.append(c)
        indices.append(lp.kv_indices)
        lengths.append(lp.lengths)
    counts_t = torch.cat(counts)
    lengths_t = torch.cat(lengths).to(torch.int64)
    kv_indptr = torch.zeros(counts_t.numel() + 1, dtype=torch.int32)
    torch.cumsum(counts_t, 0, out=kv_indptr[1:])
    last = torch.where(lengths_t == 0, torch.zeros_like(lengths_t), (lengths_t - 1) % page_size + 1)
    return DecodePlan(kv_indptr, torch.cat(indices).to(torch.int32), last.to(torch.int32), lengths_t, H, page_size)


def ragged_decode_torch(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, plan: DecodePlan,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the FlashInfer kernel computes, in torch (the oracle for the GPU path).

    ``q``: ``[R, Hkv, G, D]``; ``k_pages``/``v_pages``: ``[num_pages, page_size, D]``.
    Returns ``o`` ``[R, Hkv, G, D]`` float32 and ``lse`` ``[R, Hkv, G]`` (natural log;
    FlashInfer reports base 2).
    """
    from headkv_sglang.reference import paged_to_flat, ragged_decode

    flat_k, tok_indptr = paged_to_flat(k_pages, plan.kv_indptr.long(), plan.kv_indices.long(), plan.kv_last_page_len.long())
    flat_v, _ = paged_to_flat(v_pages, plan.kv_indptr.long(), plan.kv_indices.long(), plan.kv_last_page_len.long())
    return ragged_decode(q, flat_k, flat_v, tok_indptr, scale)
