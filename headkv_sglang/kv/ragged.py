"""RaggedAttention: attention of compressed rows, one interface, one kernel per device.

A *compressed row* is one query token of a compressed request. It attends over

* its request's prompt pages in the ragged pool, a different set of tokens per
  (layer, KV head) (:class:`~headkv_sglang.kv.pool.LayerPages`),
* ⊕ its *tail*: the positions from ``prompt_len`` on that live in SGLang's token pool
  (decoded tokens; for an extend row only those up to its own position), and
* ⊕ for RazorAttention, one compensation state per (layer, KV head) whose logit gets
  ``+log(n_dropped)``,

as one softmax over the union (equivalently, three states merged by log-sum-exp).

The serving layer calls :meth:`RaggedAttention.plan` once per forward batch (the kernel
keeps the prompt part of its plan while the batch's compressed requests stay the same:
their pages do not change while they decode; when they change, the tables of all layers
are assembled from per-request pieces built once, :mod:`headkv_sglang.kv.plan_tables`) and
:meth:`RaggedAttention.run` once per layer. Two kernels implement it:

* :class:`TorchRaggedAttention` (here): batched torch — one gather and one softmax per
  layer for all rows and heads, no Python loop over rows. The CPU serving kernel.
* ``flashinfer_ext.ragged.FlashInferRaggedAttention``: FlashInfer decode over the pages
  (``num_kv_heads=1`` rows) and over the tail, merged. The GPU serving kernel.

Both are tested against :func:`headkv_sglang.reference.ragged_decode` (the naive
per-row oracle). Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from headkv_sglang.kv.plan_tables import TableCache
from headkv_sglang.kv.pool import RaggedHeadKVPool, RequestPages, values_only_addresses


@dataclass
class RaggedRows:
    """The compressed rows of one forward batch (host-side description).

    Attributes
    ----------
    records : list[RequestPages]
        One per row (several rows may share a record: the query tokens of one request in
        an extend batch).
    tail_slots : torch.Tensor
        int64 ``[N]``: token-pool slots of every row's visible tail, rows concatenated,
        in position order (row ``r``'s tail is positions ``prompt_len ..
        prompt_len + n_r - 1``).
    tail_indptr : torch.Tensor
        int64 ``[R + 1]`` on the CPU: row ``r``'s slots are
        ``tail_slots[tail_indptr[r]:tail_indptr[r + 1]]``.
    """

    records: list[RequestPages]
    tail_slots: torch.Tensor
    tail_indptr: torch.Tensor

    def __post_init__(self) -> None:
        R = len(self.records)
        if tuple(self.tail_indptr.shape) != (R + 1,):
            raise ValueError(f"tail_indptr must be [R + 1] = [{R + 1}], got {list(self.tail_indptr.shape)}")
        if int(self.tail_indptr[-1]) != self.tail_slots.numel():
            raise ValueError(f"tail_indptr ends at {int(self.tail_indptr[-1])} but there are "
                             f"{self.tail_slots.numel()} tail slots")

    @property
    def num_rows(self) -> int:
        return len(self.records)

    @property
    def tail_lengths(self) -> torch.Tensor:
        return self.tail_indptr[1:] - self.tail_indptr[:-1]

    def prompt_key(self) -> tuple[int, ...]:
        """Identity of the prompt part: the same records in the same order keep a plan valid."""
        return tuple(id(r) for r in self.records)


class RaggedAttention(ABC):
    """``plan(rows)`` once per batch, then ``run(layer, q, k_buffer, v_buffer, scale)`` per layer."""

    def __init__(self, pool: RaggedHeadKVPool, num_layers: int, num_kv_heads: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.rows: RaggedRows | None = None

    @abstractmethod
    def plan(self, rows: RaggedRows) -> None:
        """Prepare the tables of ``rows`` (host work and copies to the device)."""

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            scale: float) -> torch.Tensor:
        """Attention of the planned rows for one layer.

        Parameters
        ----------
        layer : int
        q : torch.Tensor
            ``[R, Hq, D]`` one query per planned row; query head ``h * G + g`` belongs to
            KV head ``h`` (``G = Hq / Hkv``).
        k_buffer, v_buffer : torch.Tensor
            ``[slots, Hkv, D]``: SGLang's token pool of this layer (the tails live there).
        scale : float
            Logit scale.

        Returns
        -------
        torch.Tensor
            ``[R, Hq, D]`` in ``q``'s dtype.
        """

    def _check_run(self, layer: int, q: torch.Tensor) -> RaggedRows:
        rows = self.rows
        if rows is None:
            raise RuntimeError("RaggedAttention.run() before plan()")
        if q.dim() != 3 or q.shape[0] != rows.num_rows or q.shape[1] % self.num_kv_heads:
            raise ValueError(f"q must be [R={rows.num_rows}, Hq (a multiple of {self.num_kv_heads}), D], "
                             f"got {list(q.shape)}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        return rows


def _padded_rows(counts: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, max(counts)]`` of ``starts[r] + j`` with a validity mask (``j < counts[r]``)."""
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    j = torch.arange(width)
    mask = j[None, :] < counts[:, None]
    return torch.where(mask, starts[:, None] + j[None, :], torch.zeros_like(j)[None, :]), mask


@dataclass
class _LayerPlan:
    pages: torch.Tensor  # int64 [R*H, P] page ids of each row (0 past its pages), P: the layer's widest row
    lengths: torch.Tensor  # int64 [R*H] tokens of each row
    comp_k: torch.Tensor | None  # [R, H, D]
    comp_v: torch.Tensor | None
    comp_bias: torch.Tensor | None  # float32 [R, H]: log(count), -inf where nothing was dropped
    # PoD's values-only tokens (None when no row of the layer has any)
    vo_addr: torch.Tensor | None = None  # int64 [R*H, Nmax]: flat address in k_pages or v_pages
    vo_in_v: torch.Tensor | None = None  # bool [R*H, Nmax]: the address is in v_pages
    vo_mask: torch.Tensor | None = None  # bool [R*H, Nmax]
    # int64 [R*H, Nmax]: their tokens in the layer below's [page tokens ⊕ values-only tokens]
    stash_idx: torch.Tensor | None = None
    vo_chained: torch.Tensor | None = None  # bool [R*H]: they are the layer below's values-only tokens
    vo_own_q: torch.Tensor | None = None  # bool [R*H]: logits from this layer's queries (key sharing)
    # a pool whose pages are not one tensor (SharedPagePool): int64 [R*H, P*page_size], the
    # k_flat/v_flat row of every token of ``pages``
    tokens: torch.Tensor | None = None


class TorchRaggedAttention(RaggedAttention):
    """Batched torch kernel: padded gathers, one softmax over [pages ⊕ tail ⊕ compensation].

    Work per layer is ``R * Hkv * (widest row + max tail)``, no Python loop over rows or
    heads. The prompt tables are rebuilt only when the batch's records change, from each
    request's cached pieces (:mod:`headkv_sglang.kv.plan_tables`): a fixed number of torch
    operations for all layers and rows.
    """

    def __init__(self, pool: RaggedHeadKVPool, num_layers: int, num_kv_heads: int) -> None:
        super().__init__(pool, num_layers, num_kv_heads)
        self._prompt_key: tuple[int, ...] | None = None
        self._layers: list[_LayerPlan] = []
        self._tail_idx = self._tail_mask = None
        # PoD: (layer, keys [R, H, N, D], queries [R, H, G, D]) of the distant tokens the layer above reads
        self._stash: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.tables = TableCache(pool.page_size, pool.head_dim, pool.dtype, pool.device, dummy_empty=False)

    def plan(self, rows: RaggedRows) -> None:
        device = self.pool.device
        if rows.prompt_key() != self._prompt_key:
            self._layers = self._plan_prompt(rows.records, device)
            self._prompt_key = rows.prompt_key()
        idx, mask = _padded_rows(rows.tail_lengths, rows.tail_indptr[:-1])
        slots = rows.tail_slots.to(torch.int64).cpu()
        self._tail_idx = (slots[idx] if slots.numel() else torch.zeros_like(idx)).to(device)
        self._tail_mask = mask.to(device)
        self._stash = None
        self.rows = rows

    def _plan_prompt(self, records: list[RequestPages], device) -> list[_LayerPlan]:
        """Every layer's padded page table, from one assembly of the records' cached pieces."""
        bt = self.tables.batch(records)
        L = self.num_layers
        if bt.kv_indptr.shape[0] != L:
            raise ValueError(f"the records have {bt.kv_indptr.shape[0]} layers, the kernel {L}")
        indptr = bt.kv_indptr.to(torch.int64)
        counts = indptr[:, 1:] - indptr[:, :-1]  # [L, R*H]
        widths = [max(w, 1) for w in counts.max(dim=1).values.tolist()]
        col = torch.arange(max(widths))
        start = indptr[:, :-1] + torch.tensor(bt.layer_start[:-1], dtype=torch.int64)[:, None]
        valid = (col < counts[..., None]).to(device)
        flat = bt.flat_indices.to(torch.int64)
        if flat.numel():
            pos = (start[..., None] + col).clamp(max=flat.numel() - 1).to(device)
            pages = torch.where(valid, flat[pos], 0)  # [L, R*H, widest row of all layers]
        else:
            pages = torch.zeros(valid.shape, dtype=torch.int64, device=device)
        lengths = bt.lengths.to(device)
        comp = bt.comp
        plans = [_LayerPlan(pages[l, :, :widths[l]], lengths[l], *((comp[0][l], comp[1][l], comp[2][l])
                                                                   if comp is not None else (None, None, None)))
                 for l in range(L)]
        if not self.pool.contiguous:  # every layer's token addresses in one computation
            tokens = self.pool.page_tokens(pages).flatten(2)  # [L, R*H, widest * page_size]
            ps = self.pool.page_size
            for l, plan in enumerate(plans):
                plan.tokens = tokens[l, :, :widths[l] * ps]
        if bt.values_only:
            for l, plan in enumerate(plans):
                lps = [rec.layers[l] for rec in records]
                if any(lp.vo_lengths is not None for lp in lps):
                    self._plan_values_only(plan, lps, widths[l - 1] * self.pool.page_size if l else 0, device)
        return plans

    def _plan_values_only(self, plan: _LayerPlan, lps: list, below_width: int, device) -> None:
        """PoD: where each row's values-only tokens are, and which of the layer below's
        tokens (its ``below_width`` page tokens, then its values-only ones) give their keys."""
        H, ps = self.num_kv_heads, self.pool.page_size
        zeros = torch.zeros(H, dtype=torch.int64)
        n = torch.cat([zeros if lp.vo_lengths is None else lp.vo_lengths for lp in lps]).to(torch.int64)
        start = torch.cat([zeros if lp.vo_start is None else lp.vo_start for lp in lps]).to(torch.int64)
        pages = torch.cat([lp.vo_indices for lp in lps if lp.vo_indices is not None]).to(torch.int64)
        counts = torch.cat([zeros if lp.vo_indptr is None else lp.vo_indptr[1:] - lp.vo_indptr[:-1]
                            for lp in lps]).to(torch.int64)
        first = torch.zeros_like(counts)
        if counts.numel() > 1:
            first[1:] = torch.cumsum(counts, 0)[:-1]
        j, mask = _padded_rows(n, torch.zeros_like(n))
        if pages.numel():
            safe = torch.where(mask, j, torch.zeros_like(j))
            addr, in_v = values_only_addresses(pages, torch.where(mask, first[:, None], 0), safe, ps)
        else:
            addr, in_v = torch.zeros_like(j), torch.zeros_like(mask)
        plan.vo_addr = self.pool.physical(torch.where(mask, addr, 0).to(device))
        plan.vo_in_v = (in_v & mask).to(device)
        plan.vo_mask = mask.to(device)
        chained = start < 0
        plan.stash_idx = torch.where(mask, torch.where(chained[:, None], below_width + j, start[:, None] + j),
                                     0).to(device)
        plan.vo_chained = chained.to(device)
        plan.vo_own_q = torch.cat([torch.full((H,), lp.vo_own_queries) for lp in lps]).to(device)

    def run(self, layer: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            scale: float) -> torch.Tensor:
        rows = self._check_run(layer, q)
        R, Hq, D = q.shape
        H = self.num_kv_heads
        G = Hq // H
        lp = self._layers[layer]
        qf = q.float().view(R, H, G, D)
        kflat, vflat = self.pool.k_flat, self.pool.v_flat
        L = lp.pages.shape[1] * self.pool.page_size  # token j of a row is slot j of its pages laid end to end
        if lp.tokens is None:
            kp = self.pool.k_pages[lp.pages].float().view(R, H, L, D)
            vp = self.pool.v_pages[lp.pages].float().view(R, H, L, D)
        else:
            kp = kflat[lp.tokens].float().view(R, H, L, D)
            vp = vflat[lp.tokens].float().view(R, H, L, D)
        mask = torch.arange(L, device=kp.device)[None, :] < lp.lengths[:, None]
        logits = [torch.einsum("rhgd,rhld->rhgl", qf, kp).mul_(scale)
                  .masked_fill_(~mask.view(R, H, 1, L), -math.inf)]
        vals = [vp]
        below = self._stash
        if lp.vo_addr is not None:  # PoD: the values-only tokens' keys (and source queries) from below
            if below is None or below[0] != layer - 1:
                raise RuntimeError(f"layer {layer} shares layer {layer - 1}'s distant keys, which this "
                                   f"forward did not compute first")
            _, sk, sq = below
            N = lp.vo_addr.shape[1]
            qv = torch.where(lp.vo_own_q.view(R, H, 1, 1), qf, sq)  # key sharing: this layer's queries
            logits.append(torch.einsum("rhgd,rhnd->rhgn", qv, sk).mul_(scale)
                          .masked_fill_(~lp.vo_mask.view(R, H, 1, N), -math.inf))
            vo = torch.where(lp.vo_in_v[..., None], vflat[lp.vo_addr], kflat[lp.vo_addr])
            vals.append(vo.float().view(R, H, N, D))
        above = self._layers[layer + 1] if layer + 1 < self.num_layers else None
        if above is not None and above.stash_idx is not None:  # PoD: the layer above reads these keys
            keys, q_src = kp, qf
            if lp.vo_addr is not None:  # a longer group: its values-only tokens' keys pass on
                keys = torch.cat([kp, sk], dim=2)
                q_src = torch.where(above.vo_chained.view(R, H, 1, 1), sq, qf)
            n = above.stash_idx.shape[1]
            idx = above.stash_idx.view(R, H, n, 1).clamp(max=keys.shape[2] - 1).expand(R, H, n, D)
            self._stash = (layer, torch.gather(keys, 2, idx), q_src)
        T = self._tail_idx.shape[1]
        kt = k_buffer[self._tail_idx].float()  # [R, T, H, D]
        vt = v_buffer[self._tail_idx].float()
        logits.append(torch.einsum("rhgd,rthd->rhgt", qf, kt).mul_(scale)
                      .masked_fill_(~self._tail_mask.view(R, 1, 1, T), -math.inf))
        vals.append(vt.permute(0, 2, 1, 3))
        if lp.comp_k is not None:
            lc = torch.einsum("rhgd,rhd->rhg", qf, lp.comp_k.float()) * scale + lp.comp_bias[:, :, None]
            logits.append(lc[..., None])
            vals.append(lp.comp_v.float()[:, :, None, :])
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1).nan_to_num_(0.0)  # a row with nothing: 0
        out = torch.einsum("rhgl,rhld->rhgd", probs, torch.cat(vals, dim=2))
        return out.reshape(R, Hq, D).to(q.dtype)


class GraphRows:
    """Where a graphed kernel's rows sit in a padded decode batch, in fixed buffers.

    A CUDA graph of a decode batch of ``bs`` rows (SGLang pads a batch up to a captured size)
    always runs a graphed :class:`RaggedAttention` over ``max_rows`` rows, whichever of the
    batch's rows are compressed at replay. Before each replay :meth:`fill` writes which
    batch rows are compressed; inside the graph :meth:`queries` gathers their queries
    (``max_rows`` of them, padding rows read batch row 0) and :meth:`merge` writes the
    kernel's outputs over those rows of the wrapped backend's output, leaving every other
    row (uncompressed, padding) as it was. Fixed shapes, no host reads: both can be captured.

    Buffers (int64 / bool, on the device): ``q_index [max_rows]`` batch row of each kernel
    row; ``row_of [max_bs]`` kernel row of each batch row (0 where not compressed);
    ``is_comp [max_bs]``.
    """

    def __init__(self, max_bs: int, max_rows: int, device: torch.device | str) -> None:
        if max_bs <= 0 or max_rows <= 0:
            raise ValueError(f"GraphRows needs max_bs > 0 and max_rows > 0, got {max_bs}, {max_rows}")
        self.max_bs, self.max_rows = max_bs, max_rows
        self.q_index = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.row_of = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.is_comp = torch.zeros(max_bs, dtype=torch.bool, device=device)

    def fill(self, positions: list[int], bs: int) -> None:
        """Batch rows ``positions`` (each ``< bs``) are the kernel's rows 0, 1, ... (host work and
        three copies; before a replay, outside the graph)."""
        if not 0 < bs <= self.max_bs:
            raise ValueError(f"a graphed batch of {bs} rows, the buffers hold 1..{self.max_bs}")
        if len(positions) > self.max_rows:
            raise ValueError(f"{len(positions)} compressed rows in a graphed batch, the graphed kernel holds at "
                             f"most {self.max_rows}")
        if positions and not (0 <= min(positions) and max(positions) < bs):
            raise ValueError(f"compressed rows {positions} outside the batch's {bs} rows")
        pos = torch.tensor(positions, dtype=torch.int64)
        q_index = torch.zeros(self.max_rows, dtype=torch.int64)
        q_index[:len(positions)] = pos
        row_of = torch.zeros(self.max_bs, dtype=torch.int64)
        row_of[pos] = torch.arange(len(positions), dtype=torch.int64)
        is_comp = torch.zeros(self.max_bs, dtype=torch.bool)
        is_comp[pos] = True
        self.q_index.copy_(q_index)
        self.row_of.copy_(row_of)
        self.is_comp.copy_(is_comp)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """``[max_rows, Hq, D]``: the kernel rows' queries, out of the batch's ``q`` ``[bs, Hq, D]``."""
        return q.index_select(0, self.q_index)

    def merge(self, o: torch.Tensor, out: torch.Tensor) -> None:
        """Write the kernel's ``out`` ``[max_rows, Hq, Dv]`` over the compressed rows of ``o``
        ``[bs, Hq, Dv]`` (in place)."""
        bs = o.shape[0]
        o.copy_(torch.where(self.is_comp[:bs, None, None], out.index_select(0, self.row_of[:bs]).to(o.dtype), o))


def rows_for_queries(records: list[RequestPages], req_to_token: torch.Tensor, req_pool_indices: list[int],
                     tail_starts: list[int], tail_ends: list[int]) -> RaggedRows:
    """Rows whose tails are ``req_to_token[idx, start:end]``, one gather for all of them.

    ``tail_starts``: each row's ``prompt_len``; ``tail_ends``: one past the newest position
    the row's query sees (``seq_len`` for a decode query). ``req_to_token``: SGLang's
    ``[rows, max_context]`` int32 slot table (any device).
    """
    lengths = torch.tensor([e - s for s, e in zip(tail_starts, tail_ends)], dtype=torch.int64)
    if bool((lengths < 0).any()):
        raise ValueError(f"a row ends before its prompt: starts {tail_starts}, ends {tail_ends}")
    indptr = torch.zeros(len(records) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=indptr[1:])
    if len(records) == 0 or int(indptr[-1]) == 0:
        slots = torch.zeros(0, dtype=torch.int64, device=req_to_token.device)
    else:
        # one gather: the (row, position) pairs of every tail, flattened
        row = torch.repeat_interleave(torch.tensor(req_pool_indices, dtype=torch.int64), lengths)
        pos = torch.arange(int(indptr[-1])) - torch.repeat_interleave(indptr[:-1], lengths) \
            + torch.repeat_interleave(torch.tensor(tail_starts, dtype=torch.int64), lengths)
        slots = req_to_token[row.to(req_to_token.device), pos.to(req_to_token.device)].to(torch.int64)
    return RaggedRows(list(records), slots, indptr)
