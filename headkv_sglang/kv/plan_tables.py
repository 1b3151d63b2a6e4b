"""Page tables of a batch's compressed rows, every layer at once, assembled from per-request pieces.

A compressed row's prompt part is, for each layer, one CSR row per KV head
(:class:`~headkv_sglang.kv.pool.LayerPages`). The kernels want each layer's rows of the
whole batch as one CSR table (FlashInfer's ``kv_indptr`` / ``kv_indices`` /
``kv_last_page_len``, rows ``r * Hkv + h``). Building those per layer from the requests'
``LayerPages`` costs ``layers x requests`` small host operations at every batch change
(a request in or out, a decode move adding pages), which at 32 layers x 32 requests is
several milliseconds a step. Instead:

* :class:`RecordTables` — one request's rows for **all** layers, stacked: page counts,
  lengths and last-page lengths ``[L, Hkv]``, the page ids (on the device) split per layer,
  Razor's compensation states ``[L, Hkv, D]``. Built once per ``RequestPages.layers``
  list (a record's page tables never change once it may have been planned: a decode move
  makes a new one, so a list's identity names its tables), then reused by every batch
  holding the request.
* :func:`assemble` — a batch's :class:`BatchTables` from its rows' pieces with a fixed
  number of torch operations (stacks, one cumsum, one concatenation of the
  ``layers x requests`` page-id views), independent of the number of layers and rows;
  no per-row Python work beyond listing the pieces.
* :class:`TableCache` — the pieces of the requests seen lately, keyed by their ``layers``
  list (a kernel keeps one).

Optionally every empty row gets one dummy token of page 0 (FlashInfer has no empty row; the
kernel masks it out afterwards) and the batch is padded with empty rows (a CUDA graph
needs a fixed row count). Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headkv_sglang.kv.pool import LayerPages


@dataclass(frozen=True)
class RecordTables:
    """One request's rows of every layer (``L`` layers x ``H`` KV heads).

    Attributes
    ----------
    layers : list[LayerPages]
        The record's tables these were built from (kept: its identity is the cache key).
    meta : torch.Tensor
        int64 ``[L, H, 3]`` on the host: per row its pages (a dummy page included for an
        empty row when built with ``dummy_empty``), its tokens (0: empty) and the tokens on
        its last page (1 for a dummy, 0 for an empty row without one). One tensor, so a
        batch stacks them in one operation.
    layer_indices : tuple[torch.Tensor, ...]
        ``L`` int32 views on the device: each layer's page ids, rows in head order (with
        the dummies).
    comp : tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
        Razor's compensation: ``k, v`` ``[L, H, D]`` in the pool's dtype and float32
        ``bias`` ``[L, H]`` = ``log(n_dropped)``, ``-inf`` where nothing was dropped (all on
        the device); None if no layer has any.
    values_only : bool
        Some layer holds PoD's values-only tokens (not in these tables).
    """

    layers: list
    meta: torch.Tensor
    layer_indices: tuple
    comp: tuple | None
    values_only: bool

    @property
    def counts(self) -> torch.Tensor:
        return self.meta[..., 0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.meta[..., 1]

    @property
    def last_page_len(self) -> torch.Tensor:
        return self.meta[..., 2]


def build_record_tables(layers: list[LayerPages], page_size: int, head_dim: int, dtype: torch.dtype,
                        device: torch.device | str, dummy_empty: bool) -> RecordTables:
    """A request's :class:`RecordTables` (a few ops per layer, once per request).

    Raises ValueError if a layer's pages do not hold its lengths at ``page_size``.
    """
    L = len(layers)
    if L == 0:
        raise ValueError("a compressed request has no layers")
    H = layers[0].lengths.numel()
    for l, lp in enumerate(layers):
        if lp.lengths.numel() != H or lp.kv_indptr.numel() != H + 1:
            raise ValueError(f"layer {l} has {lp.lengths.numel()} KV heads ({lp.kv_indptr.numel()} indptr "
                             f"entries), layer 0 has {H}")
    indptr = torch.stack([lp.kv_indptr.cpu() for lp in layers]).to(torch.int64)  # [L, H+1]
    lengths = torch.stack([lp.lengths.cpu() for lp in layers]).to(torch.int64)  # [L, H]
    sizes = torch.tensor([lp.kv_indices.numel() for lp in layers], dtype=torch.int64)
    counts = indptr[:, 1:] - indptr[:, :-1]
    bad = ((counts != (lengths + page_size - 1) // page_size).any(dim=1) | (indptr[:, 0] != 0)
           | (indptr[:, -1] != sizes))
    if bool(bad.any()):
        l = int(bad.nonzero()[0])
        raise ValueError(f"layer {l}: pages per row {counts[l].tolist()} do not hold lengths {lengths[l].tolist()} "
                         f"at page_size {page_size} (its table lists {int(sizes[l])} pages)")
    indices = torch.cat([lp.kv_indices.reshape(-1).cpu() for lp in layers]).to(torch.int32)
    empty = lengths == 0
    last = torch.where(empty, 0, (lengths - 1) % page_size + 1)
    if dummy_empty and bool(empty.any()):
        # each empty row gets page 0 with one token: rows are layer-major, heads in order
        filled = torch.where(empty, 1, counts)
        row = torch.repeat_interleave(torch.arange(L * H), filled.reshape(-1))
        starts = torch.cumsum(filled.reshape(-1), 0) - filled.reshape(-1)
        src = (indptr[:, :-1] + (torch.cumsum(sizes, 0) - sizes)[:, None]).reshape(-1)[row] \
            + torch.arange(row.numel()) - starts[row]
        keep = ~empty.reshape(-1)[row]
        indices = torch.where(keep, indices[src.clamp(max=max(indices.numel() - 1, 0))] if indices.numel()
                              else torch.zeros_like(src, dtype=torch.int32), 0).to(torch.int32)
        counts, last = filled, torch.where(empty, 1, last)
    split = tuple(indices.to(device).split(counts.sum(dim=1).tolist()))
    comp = None
    if any(lp.comp_count is not None for lp in layers):
        zeros = torch.zeros(H, head_dim, dtype=dtype, device=device)
        ck = torch.stack([zeros if lp.comp_count is None else lp.comp_k.to(device, dtype) for lp in layers])
        cv = torch.stack([zeros if lp.comp_count is None else lp.comp_v.to(device, dtype) for lp in layers])
        cnt = torch.stack([torch.zeros(H, dtype=torch.int64) if lp.comp_count is None
                           else lp.comp_count.cpu().to(torch.int64) for lp in layers]).float()
        bias = torch.where(cnt > 0, torch.log(cnt.clamp(min=1)), -math.inf).to(device)
        comp = (ck, cv, bias)
    values_only = any(lp.vo_lengths is not None for lp in layers)
    return RecordTables(layers, torch.stack([counts, lengths, last], dim=-1), split, comp, values_only)


@dataclass
class BatchTables:
    """Every layer's CSR table of a batch of ``rows`` rows (``rows * H`` kernel rows per layer).

    Attributes
    ----------
    kv_indptr : torch.Tensor
        int32 ``[L, rows*H + 1]`` host: layer ``l``'s row ``i`` is pages
        ``indices(l)[kv_indptr[l, i]:kv_indptr[l, i+1]]`` (each layer from 0).
    kv_last_page_len : torch.Tensor
        int32 ``[L, rows*H]`` host.
    lengths : torch.Tensor
        int64 ``[L, rows*H]`` host: tokens per row.
    empty : torch.Tensor
        bool ``[L, rows*H]`` on the device: rows with no token (padding rows included).
    flat_indices : torch.Tensor
        int32 ``[total]`` on the device: all layers' page ids, layer after layer.
    layer_start : list[int]
        ``L + 1`` offsets of each layer's ids in ``flat_indices``.
    pages : list[int]
        Real pages per layer (dummies not counted).
    comp : tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
        ``k, v`` ``[L, rows, H, D]`` and float32 ``bias`` ``[L, rows, H]`` (``-inf``: no
        compensation), or None when no row has any.
    rows : int
        Planned rows (the first ``rows - pad`` are real).
    pad : int
        Padding rows at the end (empty).
    empty_rows : list[bool]
        Per layer: whether any of its rows is empty (host; no device read needed).
    values_only : bool
        Some row holds PoD's values-only tokens in some layer (not in these tables).
    """

    kv_indptr: torch.Tensor
    kv_last_page_len: torch.Tensor
    lengths: torch.Tensor
    empty: torch.Tensor
    flat_indices: torch.Tensor
    layer_start: list[int]
    pages: list[int]
    comp: tuple | None
    rows: int
    pad: int
    empty_rows: list[bool]
    values_only: bool

    def indices(self, layer: int) -> torch.Tensor:
        """int32 ``[pages of layer]`` on the device: layer ``layer``'s page ids."""
        return self.flat_indices[self.layer_start[layer]:self.layer_start[layer + 1]]

    def per_layer(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        """``(kv_indptr, indices, kv_last_page_len, empty, any empty)`` of each layer, views."""
        sizes = [b - a for a, b in zip(self.layer_start[:-1], self.layer_start[1:])]
        return list(zip(self.kv_indptr.unbind(0), self.flat_indices.split(sizes), self.kv_last_page_len.unbind(0),
                        self.empty.unbind(0), self.empty_rows))


def assemble(pieces: list[RecordTables], page_size: int, device: torch.device | str, *,
             pad_to: int | None = None, dummy_empty: bool = False, out: torch.Tensor | None = None) -> BatchTables:
    """The batch tables of rows ``pieces`` (one per row, in batch order; a piece may repeat).

    A fixed number of torch operations whatever the number of layers and rows, plus one
    concatenation of ``L x rows`` views. ``pad_to``: rows after padding with empty ones (each
    with one dummy page when ``dummy_empty``; the pieces must then be built with
    ``dummy_empty`` too). ``out``: an int32 device buffer that holds the page ids when large
    enough (the tables then alias it).
    """
    R = len(pieces)
    if R == 0:
        raise ValueError("a batch needs at least one compressed row")
    L, H, _ = pieces[0].meta.shape
    pad = 0 if pad_to is None else pad_to - R
    if pad < 0:
        raise ValueError(f"{R} rows, more than the {pad_to} the batch is padded to")
    meta = torch.stack([p.meta for p in pieces], dim=1)  # [L, R, H, 3]
    if pad:  # empty rows: a dummy page of one token each, or nothing
        fill = torch.tensor([1, 0, 1] if dummy_empty else [0, 0, 0], dtype=meta.dtype)
        meta = torch.cat([meta, fill.expand(L, pad, H, 3)], dim=1)
    rows = R + pad
    meta = meta.view(L, rows * H, 3)
    counts, lengths = meta[..., 0], meta[..., 1]
    kv_indptr = torch.zeros(L, rows * H + 1, dtype=torch.int32)
    torch.cumsum(counts, dim=1, out=kv_indptr[:, 1:])
    layer_start = [0]
    for n in kv_indptr[:, -1].tolist():
        layer_start.append(layer_start[-1] + n)
    dummies = [torch.zeros(pad * H, dtype=torch.int32, device=device)] * L if pad and dummy_empty else None
    per_layer = [p.layer_indices for p in pieces] + ([dummies] if pad and dummy_empty else [])
    ids = [ids[l] for l in range(L) for ids in per_layer]
    total = layer_start[-1]
    if out is not None and out.numel() >= total:  # on the device: one copy of all ids
        flat = torch.cat(ids, out=out[:total])
    else:
        flat = torch.cat(ids)
    empty = lengths == 0
    pages = ((lengths + page_size - 1) // page_size).sum(dim=1).tolist()
    comp = None
    if any(p.comp is not None for p in pieces):
        first = next(p.comp for p in pieces if p.comp is not None)
        zk = torch.zeros_like(first[0])
        nb = torch.full_like(first[2], -math.inf)
        ck = [zk if p.comp is None else p.comp[0] for p in pieces] + [zk] * pad
        cv = [zk if p.comp is None else p.comp[1] for p in pieces] + [zk] * pad
        cb = [nb if p.comp is None else p.comp[2] for p in pieces] + [nb] * pad
        comp = (torch.stack(ck, dim=1), torch.stack(cv, dim=1), torch.stack(cb, dim=1))
    return BatchTables(kv_indptr, meta[..., 2].to(torch.int32), lengths, empty.to(device), flat, layer_start,
                       pages, comp, rows, pad, empty.any(dim=1).tolist(), any(p.values_only for p in pieces))


class TableCache:
    """The :class:`RecordTables` of recently planned requests, keyed by their ``layers`` list.

    Holding the list keeps its identity from being reused by another request's tables.
    Entries not in the latest batch are dropped once the cache holds more than
    ``2 x batch + 64`` of them.
    """

    def __init__(self, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 dummy_empty: bool) -> None:
        self.page_size, self.head_dim, self.dtype = page_size, head_dim, dtype
        self.device, self.dummy_empty = device, dummy_empty
        self._pieces: dict[int, RecordTables] = {}
        # page ids of the latest batch go here (no fresh allocation of megabytes per batch
        # change): a batch's tables are valid until the cache's next batch
        self._ids: torch.Tensor | None = None
        self.built = 0  # pieces built so far (tests and benchmarks read it)

    def piece(self, layers: list[LayerPages]) -> RecordTables:
        p = self._pieces.get(id(layers))
        if p is None:
            p = build_record_tables(layers, self.page_size, self.head_dim, self.dtype, self.device,
                                    self.dummy_empty)
            self._pieces[id(layers)] = p
            self.built += 1
        assert p.layers is layers, f"table cache key {id(layers)} names another request's tables"
        return p

    def batch(self, records, *, pad_to: int | None = None) -> BatchTables:
        """:func:`assemble` of ``records`` (``RequestPages``, one per row), pieces built as needed."""
        pieces = [self.piece(rec.layers) for rec in records]
        if len(self._pieces) > 2 * len(pieces) + 64:
            live = {id(p.layers) for p in pieces}
            self._pieces = {k: v for k, v in self._pieces.items() if k in live}
        bt = assemble(pieces, self.page_size, self.device, pad_to=pad_to, dummy_empty=self.dummy_empty,
                      out=self._ids)
        if self._ids is None or bt.flat_indices.numel() > self._ids.numel():  # room for some growth
            self._ids = torch.empty(bt.flat_indices.numel() * 5 // 4 + 1024, dtype=torch.int32, device=self.device)
        return bt


def token_tables(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                 page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's CSR page table re-expressed token by token.

    For pages that are not whole blocks of memory (``--kv-memory shared``: a page's tokens are
    head-vectors scattered over token slots, :class:`~headkv_sglang.kv.shared_memory.SharedPagePool`):
    a paged kernel then reads ``k_flat``/``v_flat`` as ``[rows, 1, D]`` at the ``physical`` rows of
    these addresses (one ``physical`` call for every layer's, by the caller).
    ``kv_indptr`` int32 ``[rows + 1]`` and ``kv_last_page_len`` int32 ``[rows]`` on the host,
    ``kv_indices`` int32 on the host or the device (a dummy page of one token stays one
    token). Returns ``(indptr, addresses, last_page_len)``: ``indptr`` and ``last_page_len``
    (all ones) int32 on the host; ``addresses`` int64 page addresses (``page * page_size +
    token``) on ``kv_indices``' device, row after row.
    """
    indptr = kv_indptr.to(torch.int64)
    counts = indptr[1:] - indptr[:-1]
    last = kv_last_page_len.to(torch.int64)
    tokens = torch.where(counts > 0, (counts - 1) * page_size + last, 0)
    row = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # each page's row
    place = torch.arange(row.numel()) - indptr[:-1][row]  # the page's place in its row
    filled = torch.where(place == counts[row] - 1, last[row], page_size)  # tokens on each page
    keep = torch.arange(page_size)[None, :] < filled[:, None]  # [pages, page_size]
    device = kv_indices.device
    addr = kv_indices.to(torch.int64)[:, None] * page_size + torch.arange(page_size, device=device)
    addr = addr[keep.to(device)]
    out_indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    torch.cumsum(tokens, 0, out=out_indptr[1:])
    assert addr.numel() == int(out_indptr[-1]), f"{addr.numel()} token addresses for {int(out_indptr[-1])} tokens"
    return out_indptr, addr, torch.ones(counts.numel(), dtype=torch.int32)
