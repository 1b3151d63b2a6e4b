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

import math
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
    """Plan one layer of a decode batch (a few batched ops, no loop over requests).

    Parameters
    ----------
    layers : sequence of ``headkv_sglang.kv.pool.LayerPages``
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
    for r, lp in enumerate(layers):
        if lp.lengths.numel() != H or lp.kv_indptr.numel() != H + 1:
            raise ValueError(f"request {r} has {lp.lengths.numel()} KV heads, request 0 has {H}")
    indptrs = torch.stack([lp.kv_indptr for lp in layers]).to(torch.int64)  # [R, H+1]
    lengths_t = torch.cat([lp.lengths for lp in layers]).to(torch.int64)  # [R*H]
    indices = torch.cat([lp.kv_indices for lp in layers])
    counts_t = (indptrs[:, 1:] - indptrs[:, :-1]).reshape(-1)
    need = (lengths_t + page_size - 1) // page_size
    sizes = torch.tensor([lp.kv_indices.numel() for lp in layers], dtype=torch.int64)
    bad = ((counts_t != need).view(len(layers), H).any(dim=1) | (indptrs[:, 0] != 0)
           | (indptrs[:, -1] != sizes))
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        lp = layers[r]
        raise ValueError(f"request {r}: pages per row {(lp.kv_indptr[1:] - lp.kv_indptr[:-1]).tolist()} "
                         f"do not hold lengths {lp.lengths.tolist()} at page_size {page_size} "
                         f"(its table lists {lp.kv_indices.numel()} pages)")
    kv_indptr = torch.zeros(counts_t.numel() + 1, dtype=torch.int32)
    torch.cumsum(counts_t, 0, out=kv_indptr[1:])
    last = torch.where(lengths_t == 0, torch.zeros_like(lengths_t), (lengths_t - 1) % page_size + 1)
    return DecodePlan(kv_indptr, indices.to(torch.int32), last.to(torch.int32), lengths_t, H, page_size)


def pad_plan(plan: DecodePlan, rows: int) -> DecodePlan:
    """``plan`` with empty rows appended up to ``rows`` (a CUDA graph needs a fixed row count)."""
    pad = rows - plan.num_rows
    if pad < 0:
        raise ValueError(f"the plan has {plan.num_rows} rows, more than the {rows} it is padded to")
    if pad == 0:
        return plan
    end = plan.kv_indptr[-1:].expand(pad)
    return DecodePlan(torch.cat([plan.kv_indptr, end]), plan.kv_indices,
                      torch.cat([plan.kv_last_page_len, torch.zeros(pad, dtype=plan.kv_last_page_len.dtype)]),
                      torch.cat([plan.lengths, torch.zeros(pad, dtype=plan.lengths.dtype)]),
                      plan.num_kv_heads, plan.page_size)


def fill_empty_rows(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer has no empty row: give each one page 0 with one token (masked out afterwards).

    Returns ``(kv_indptr, kv_indices, kv_last_page_len, empty)`` (``empty`` bool ``[rows]``);
    batched, no loop over rows.
    """
    counts = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int64)
    empty = counts == 0
    if not bool(empty.any()):
        return kv_indptr, kv_indices, kv_last_page_len, empty
    counts2 = torch.where(empty, torch.ones_like(counts), counts)
    indptr2 = torch.zeros(counts2.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts2, 0, out=indptr2[1:])
    row = torch.repeat_interleave(torch.arange(counts2.numel()), counts2)
    src = kv_indptr[:-1].to(torch.int64)[row] + torch.arange(row.numel()) - indptr2[:-1][row]
    if kv_indices.numel():
        indices = torch.where(empty[row], torch.zeros_like(src), kv_indices.to(torch.int64)[src.clamp(max=kv_indices.numel() - 1)])
    else:
        indices = torch.zeros_like(src)
    last = torch.where(empty, torch.ones_like(kv_last_page_len), kv_last_page_len)
    return indptr2.to(kv_indptr.dtype), indices.to(kv_indices.dtype), last, empty


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


@dataclass
class ChunkPlan:
    """Rows cut into chunks of at most ``chunk_pages`` pages, each chunk one kernel row.

    A long row on one thread block is a straggler: HeadKV gives a few heads most of the
    budget, and with thousands of rows FlashInfer does not split the KV itself. The chunks
    of a row are merged afterwards (:func:`merge_chunks`). ``chunk_row`` int64 ``[C]``: the
    row of each chunk, ``num_rows`` for padding chunks (one token of page 0, dropped);
    ``q_index``: the query row each chunk reads (0 for padding). Empty rows get no chunk.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    chunk_row: torch.Tensor
    q_index: torch.Tensor
    num_rows: int
    page_size: int

    @property
    def num_chunks(self) -> int:
        return self.chunk_row.numel()


def split_rows(plan: DecodePlan, chunk_pages: int, pad_to: int | None = None) -> ChunkPlan:
    """Cut each row of ``plan`` into chunks of ``chunk_pages`` pages (the last may be shorter).

    ``pad_to``: total chunks after padding (a CUDA graph needs a fixed count); an error when
    the rows need more.
    """
    if chunk_pages <= 0:
        raise ValueError(f"chunk_pages must be > 0, got {chunk_pages}")
    rows = plan.num_rows
    counts = (plan.kv_indptr[1:] - plan.kv_indptr[:-1]).long()
    nchunks = (counts + chunk_pages - 1) // chunk_pages
    chunk_row = torch.repeat_interleave(torch.arange(rows), nchunks)
    first = torch.zeros(rows, dtype=torch.int64)
    if rows > 1:
        torch.cumsum(nchunks[:-1], 0, out=first[1:])
    j = torch.arange(chunk_row.numel()) - first[chunk_row]  # chunk number within its row
    pages = torch.minimum(counts[chunk_row] - j * chunk_pages, torch.full_like(j, chunk_pages))
    final = j == nchunks[chunk_row] - 1
    last = torch.where(final, plan.kv_last_page_len.long()[chunk_row], torch.full_like(j, plan.page_size))
    # chunks are consecutive slices of each row's page list, rows in order: the page list is unchanged
    indices = plan.kv_indices.to(torch.int32)
    q_index = chunk_row.clone()
    if pad_to is not None:
        pad = pad_to - chunk_row.numel()
        if pad < 0:
            raise ValueError(f"the rows need {chunk_row.numel()} chunks of {chunk_pages} pages, more than the "
                             f"{pad_to} this plan is padded to")
        chunk_row = torch.cat([chunk_row, torch.full((pad,), rows, dtype=torch.int64)])
        q_index = torch.cat([q_index, torch.zeros(pad, dtype=torch.int64)])
        pages = torch.cat([pages, torch.ones(pad, dtype=torch.int64)])
        last = torch.cat([last, torch.ones(pad, dtype=torch.int64)])
        indices = torch.cat([indices, torch.zeros(pad, dtype=torch.int32)])
    kv_indptr = torch.zeros(pages.numel() + 1, dtype=torch.int32)
    torch.cumsum(pages, 0, out=kv_indptr[1:])
    return ChunkPlan(kv_indptr, indices, last.to(torch.int32), chunk_row, q_index, rows, plan.page_size)


def merge_chunks(o: torch.Tensor, lse: torch.Tensor, chunk_row: torch.Tensor, num_rows: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-chunk attention states into per-row states (log-sum-exp weighting).

    ``o`` ``[C, G, D]``, ``lse`` ``[C, G]`` natural log, ``chunk_row`` int64 ``[C]`` (values up to
    ``num_rows``, the padding row, which is dropped). Returns float32 ``o [num_rows, G, D]`` and
    ``lse [num_rows, G]``; a row with no chunk gets ``o = 0``, ``lse = -inf``. Fixed shapes and no
    host sync, so it can be captured in a CUDA graph.
    """
    C, G, D = o.shape
    idx = chunk_row.to(o.device)
    lse = lse.float()
    m = torch.full((num_rows + 1, G), -math.inf, dtype=torch.float32, device=o.device)
    m.scatter_reduce_(0, idx[:, None].expand(C, G), lse, reduce="amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m.index_select(0, idx))
    den = torch.zeros(num_rows + 1, G, dtype=torch.float32, device=o.device).index_add_(0, idx, w)
    num = torch.zeros(num_rows + 1, G, D, dtype=torch.float32, device=o.device).index_add_(
        0, idx, w[..., None] * o.float())
    out = num[:num_rows] / den[:num_rows, :, None].clamp_min(torch.finfo(torch.float32).tiny)
    return out, m[:num_rows] + torch.log(den[:num_rows])
