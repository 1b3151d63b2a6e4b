"""Decode-phase compression: moving a compressed request's generated tokens into its pages.

The :class:`~headkv_sglang.kv.manager.CompressionManager`'s decode job (a mixin, like
:mod:`headkv_sglang.kv.prefill`): the decode forward keeps each compressed request's recent
decode queries (:meth:`DecodeCompression.capture_decode_query`), asks which tail positions
are due (:meth:`~DecodeCompression.decode_due`) and, after its last layer, moves them
(:meth:`~DecodeCompression.compress_decode`); the request state's ``moved`` then tells the
serving layer which token slots to free. Policy math: ``policies/decode.py``.
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from headkv_sglang.kv.pool import DECODE_OFF, PoolFullError, RequestPages
from headkv_sglang.kv.ranks import agreed, borrow_together
from headkv_sglang.kv.tables import page_addresses
from headkv_sglang.policies.d2o import merge_dropped
from headkv_sglang.policies.decode import decode_chunk, decode_scores, select_decode
from headkv_sglang.policies.budgets import uniform_pages

logger = logging.getLogger("headkv_sglang")


class DecodeCompression:
    """The decode half of :class:`~headkv_sglang.kv.manager.CompressionManager`."""

    def decode_pages_bound(self, decode_budget: int) -> int:
        """Pages that a decode budget adds to a request's at most: per (layer, KV head) row,
        ``ceil((p + n) / ps) - ceil(p / ps) <= ceil(n / ps)`` for ``n <= decode_budget``."""
        return uniform_pages(self.shape.num_layers * self.shape.num_kv_heads, decode_budget, self.pool.page_size)

    def decode_pages_pending(self) -> int:
        """Pages the running compressed requests' decode budgets may still take."""
        return sum(self.decode_pages_bound(r.decode_budget) - r.decode_pages
                   for r in list(self.records.values()) if r.decode_budget > 0)

    def capture_decode_query(self, layer: int, req_pool_idx: int, q: torch.Tensor) -> None:
        """Keep a compressed request's decode query of ``layer`` (``q``: ``[Hq, D]``) when it
        has a decode budget: its last ``decode_window`` rank its generated tokens."""
        st = self._states.get(req_pool_idx)
        rec = st.record if st is not None else None
        if rec is None or not rec.moves_decode or rec.decode_recency:
            return
        prev = st.decode_q.get(layer)
        q = q.detach()[None]
        st.decode_q[layer] = q.clone() if prev is None else torch.cat([prev, q])[-rec.decode_window:]

    def decode_due(self, req_pool_idx: int, seq_len: int) -> tuple[int, int] | None:
        """Tail positions ``[start, end)`` to move into pages in the decode forward whose newest
        token is at ``seq_len - 1`` (all of the tail but its last ``decode_window``), or None
        while the tail is within its window plus a chunk."""
        st = self._states.get(req_pool_idx)
        rec = st.record if st is not None else None
        if rec is None or rec.decode_budget <= 0 or seq_len < rec.decode_retry_at:
            return None
        start, end = rec.tail_start, seq_len - rec.decode_window
        if end - start < decode_chunk(rec.decode_budget):
            return None
        return start, end

    def compress_decode(self, req_pool_idx: int, start: int, end: int,
                        get_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]], scale: float
                        ) -> RequestPages | None:
        """Move tail positions ``[start, end)`` of a compressed request into its pages.

        ``get_kv(layer)``: their ``k, v`` ``[end - start, num_kv_heads, head_dim]`` (SGLang's
        pool). With the generated tokens already in the pages they are ranked
        (``policies/decode.py``: the attention of the captured decode queries, ``scale`` the
        logit scale) and every row keeps the best ``min(decode_budget, candidates)``, written
        after its prompt tokens; rows grow by whole pages. The request gets a new record with
        ``tail_start = end`` and its state's ``moved = (start, end)`` for the serving layer to
        free the positions' token slots (:meth:`take_moved`). Returns the new record, or None
        when the pool (of any rank) cannot take the growth (nothing changed; retried a chunk
        later). Raises (nothing changed, on every rank) when it fails on any rank.

        Runs after the forward's last layer: every layer's attention has read the old record,
        and pages are only added, never freed, so its rows are rewritten in place — after
        the ranks' vote, the only step that cannot be undone.
        """
        t0 = time.perf_counter()
        st = self._states.get(req_pool_idx)
        rec = st.record if st is not None else None
        if rec is None:
            raise KeyError(f"row {req_pool_idx} has no compressed record ({st!r})")
        ps, D = self.pool.page_size, self.pool.head_dim
        n_old, n_move = rec.decode_kept, end - start
        n_new = min(rec.decode_budget, n_old + n_move)
        kflat, vflat = self.pool.k_flat, self.pool.v_flat
        ids, err, writes, layers, merged, grow = None, None, [], [], 0, 0
        thresholds = list(rec.decode_thresholds or [None] * len(rec.layers))
        try:
            if rec.tail_start != start or not start < end:
                raise ValueError(f"row {req_pool_idx}: tail starts at {rec.tail_start}, asked to move [{start}, {end})")
            plans = []
            for lp in rec.layers:
                prompt = lp.lengths - n_old  # each row's prompt tokens
                have = lp.kv_indptr[1:] - lp.kv_indptr[:-1]
                add = ((prompt + n_new + ps - 1) // ps - have).clamp(min=0)
                plans.append((prompt, have, add))
                grow += int(add.sum())
            with self._lock:
                self.shared.evict(grow)
            borrow_together(self.vote, self.allocator, grow)  # --kv-memory shared under --tp: every rank alike
            with self._lock:
                if not self.allocator.can_allocate(grow):
                    raise PoolFullError(f"a decode move needs {grow} pages, {self.allocator.free_pages} free")
            device = kflat.device
            queries = st.decode_q
            for layer, (lp, (prompt, _, _)) in enumerate(zip(rec.layers, plans)):
                k_new, v_new = get_kv(layer)
                k = k_new.to(device, self.pool.dtype).transpose(0, 1)  # [H, n_move, D]
                v = v_new.to(device, self.pool.dtype).transpose(0, 1)
                if n_old:
                    old = self.pool.physical(page_addresses(lp.kv_indptr, lp.kv_indices, prompt, n_old, ps).to(device))
                    k, v = torch.cat([kflat[old], k], 1), torch.cat([vflat[old], v], 1)
                if n_new < k.shape[1]:
                    if rec.decode_recency:
                        scores = decode_scores(k.new_zeros(0, 0, D), k, scale, recency=True)
                    elif layer not in queries:
                        raise RuntimeError(f"no decode queries captured for row {req_pool_idx}, layer {layer}")
                    else:
                        q = queries[layer].transpose(0, 1).to(device)  # [Hq, n, D]
                        if self._gather_queries is not None:  # replicated KV heads: the whole group
                            q = self._gather_queries(q)
                        scores = decode_scores(q, k, scale)
                    idx = select_decode(scores, n_new)
                    sel = idx[..., None].expand(-1, -1, D)
                    k_all, v_all = k, v
                    k, v = torch.gather(k, 1, sel), torch.gather(v, 1, sel)
                    if rec.decode_merge:  # D2O: the dropped ones merge into their most similar kept one
                        H = k.shape[0]
                        keep = torch.zeros(k_all.shape[:2], dtype=torch.bool, device=device).scatter_(1, idx, True)
                        indptr = torch.arange(H + 1, dtype=torch.int64) * n_new
                        stats: dict = {}
                        kf, vf = merge_dropped(k_all, v_all, keep, k.reshape(-1, D), v.reshape(-1, D), indptr,
                                               gather=self._gather, prev_threshold=thresholds[layer], stats=stats)
                        k, v = kf.view(H, n_new, D), vf.view(H, n_new, D)
                        thresholds[layer] = stats.get("threshold", thresholds[layer])
                        merged += stats.get("merged", 0)
                writes.append((k, v))
            with self._lock:
                ids = self.allocator.allocate(grow, owner=req_pool_idx)
            cursor = 0
            for lp, (prompt, have, add), (k, v) in zip(rec.layers, plans, writes):
                parts = []
                for h in range(have.numel()):  # each row's pages, then the ones it grows by
                    parts.append(lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])])
                    a = int(add[h])
                    parts.append(torch.tensor(ids[cursor:cursor + a], dtype=torch.int64))
                    cursor += a
                kv_indptr = torch.zeros(have.numel() + 1, dtype=torch.int64)
                torch.cumsum(have + add, 0, out=kv_indptr[1:])
                kv_indices = torch.cat(parts)
                dest = page_addresses(kv_indptr, kv_indices, prompt, n_new, ps).to(device).reshape(-1)
                new = dataclasses.replace(lp, kv_indptr=kv_indptr, kv_indices=kv_indices, lengths=prompt + n_new)
                new._page_size = ps
                layers.append((new, dest))
        except Exception as e:
            err = e
        try:
            if err is None or not agreed(err):
                self.vote.close(err)
            else:
                raise err
        except PoolFullError:  # this rank's pool or another's: nothing changed, retried later
            self._free_pages(ids, req_pool_idx)
            rec.decode_retry_at = end + rec.decode_window + decode_chunk(rec.decode_budget)
            self.decode_totals["pool_full"] += 1
            return None
        except BaseException:
            self._free_pages(ids, req_pool_idx)
            raise
        # every rank agreed: the rows are rewritten in place (the old record is not read again)
        for (k, v), (_, dest) in zip(writes, layers):
            dest = self.pool.physical(dest)  # after the allocation: a shared pool may have borrowed slots
            kflat[dest] = k.reshape(-1, D)
            vflat[dest] = v.reshape(-1, D)
        new_rec = dataclasses.replace(
            rec, layers=[lp for lp, _ in layers], page_ids=rec.page_ids + ids, tail_start=end,
            decode_kept=n_new, decode_pages=rec.decode_pages + grow, decode_compressions=rec.decode_compressions + 1,
            decode_thresholds=tuple(thresholds) if rec.decode_merge else ())
        with self._lock:
            st.record = new_rec
        st.moved = (start, end)
        rows = len(rec.layers) * self.shape.num_kv_heads
        t = self.decode_totals
        t["compressions"] += 1
        t["tokens_moved"] += n_move  # positions that left SGLang's pool
        t["head_tokens_dropped"] += (n_old + n_move - n_new) * rows
        t["head_tokens_merged"] += merged
        t["ms"] += 1000 * (time.perf_counter() - t0)
        return new_rec

    def _free_pages(self, ids: list[int] | None, owner: int) -> None:
        if ids:
            with self._lock:
                self.allocator.free(ids, owner=owner)

    def decode_failed(self, req_pool_idx: int, e: Exception) -> None:
        """:meth:`compress_decode` raised ``e`` (nothing was allocated; on every rank): the
        request's decode compression stops, its tail grows whole in SGLang's pool from now on."""
        st = self._states.get(req_pool_idx)
        if st is not None and st.record is not None:
            st.record.decode_retry_at = DECODE_OFF
        self.decode_totals["errors"] += 1
        logger.error("headkv_sglang: row %d: decode-phase compression failed; its tail stays whole",
                     req_pool_idx, exc_info=(type(e), e, e.__traceback__))

    def take_moved(self) -> list[tuple[object, int, int]]:
        """``(state, start, end)`` of every row whose tail positions ``[start, end)`` a decode
        forward moved into pages; the serving layer frees their token slots (taken once)."""
        out = []
        for st in self._states.values():
            if st.moved is not None:
                out.append((st, *st.moved))
                st.moved = None
        return out

    def has_moved(self) -> bool:
        return any(st.moved is not None for st in self._states.values())
