"""Page tables and pool helpers: writing a compressed prompt's pages, and addressing them.

Pure torch; nothing here imports SGLang. ``write_prompt_pages`` turns one request's compressed
layers (``policies.base.CompressedLayer`` per layer) into its :class:`RequestPages` (FlashInfer's
CSR terms per layer), copying the kept tokens into the pages ``ids``.
"""

from __future__ import annotations

import torch

from headkv_sglang.config import KVPolicyConfig
from headkv_sglang.kv.pool import LayerPages, RaggedHeadKVPool, RequestPages


def write_prompt_pages(pool: RaggedHeadKVPool, cfg: KVPolicyConfig, seq_len: int, layers: list[tuple],
                       ids: list[int]) -> RequestPages:
    """Copy each layer's kept tokens into its pages ``ids``; the request's page tables."""
    rec = RequestPages(prompt_len=seq_len, policy=cfg.policy, budget=cfg.budget, page_ids=ids)
    cursor, prev = 0, None
    for comp, lengths, pages in layers:
        rec.kept_tokens += int(lengths.sum())
        vo = comp.values_only
        k_flat, v_flat, tok_indptr, whole = comp.k_flat, comp.v_flat, comp.indptr, lengths
        if vo is not None:  # PoD's sharing rows: their values-only tokens go to their own pages
            vo_len = values_only_counts(comp)
            whole = lengths - vo_len
            keep_whole = ~vo.to(k_flat.device)
            k_flat, v_flat = k_flat[keep_whole], v_flat[keep_whole]
            tok_indptr = torch.zeros_like(comp.indptr)
            torch.cumsum(whole.to(tok_indptr.device), 0, out=tok_indptr[1:])
        whole_pages = pool.pages_for(whole)
        kv_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(whole_pages, 0, out=kv_indptr[1:])
        kv_indices = torch.tensor(ids[cursor:cursor + int(whole_pages.sum())], dtype=torch.int64)
        cursor += int(whole_pages.sum())
        pool.write(kv_indices.to(pool.device), kv_indptr, whole, k_flat, v_flat, tok_indptr)
        lp = LayerPages(kv_indptr=kv_indptr, kv_indices=kv_indices, lengths=whole,
                        comp_k=comp.comp_k, comp_v=comp.comp_v, comp_count=comp.comp_count)
        if vo is not None:
            vo_pages = pages - whole_pages
            lp.vo_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(vo_pages, 0, out=lp.vo_indptr[1:])
            lp.vo_indices = torch.tensor(ids[cursor:cursor + int(vo_pages.sum())], dtype=torch.int64)
            cursor += int(vo_pages.sum())
            lp.vo_lengths, lp.vo_start = vo_len, values_only_starts(comp, prev)
            lp.vo_own_queries = cfg.pod_sharing == "keys"
            vo_tok = torch.zeros_like(comp.indptr)
            torch.cumsum(vo_len.to(vo_tok.device), 0, out=vo_tok[1:])
            pool.write_values(lp.vo_indices, lp.vo_indptr, vo_len, comp.v_flat[vo.to(comp.v_flat.device)],
                                   vo_tok)
        lp._page_size = pool.page_size
        rec.layers.append(lp)
        prev = comp
    assert cursor == len(ids), f"wrote {cursor} of {len(ids)} pages"
    return rec


def values_only_counts(comp) -> torch.Tensor:
    """int64 ``[H]`` (CPU): each row's values-only tokens in a CompressedLayer."""
    H = comp.indptr.numel() - 1
    if comp.values_only is None:
        return torch.zeros(H, dtype=torch.int64)
    lengths = comp.lengths.cpu()
    row = torch.repeat_interleave(torch.arange(H), lengths)
    return torch.zeros(H, dtype=torch.int64).index_add_(0, row, comp.values_only.cpu().to(torch.int64))


def values_only_starts(comp, prev) -> torch.Tensor:
    """int64 ``[H]``: where each row's values-only tokens sit in the same head's row of the
    layer below (``prev``): its whole tokens before the first values-only position, or -1
    where they are that row's own values-only tokens (a PoD group of more than two layers:
    the stash passes on). Either way they must be the same positions there (what PoD's
    ``link_layer`` guarantees)."""
    H = comp.indptr.numel() - 1
    out = torch.zeros(H, dtype=torch.int64)
    if prev is None:
        raise ValueError("values-only tokens in the first layer: there is no layer below to share with")
    vo, ind, ptr = comp.values_only.cpu(), comp.indices.cpu(), comp.indptr.cpu()
    pind, pptr = prev.indices.cpu(), prev.indptr.cpu()
    pvo = prev.values_only.cpu() if prev.values_only is not None else None
    for h in range(H):
        mine = ind[int(ptr[h]):int(ptr[h + 1])][vo[int(ptr[h]):int(ptr[h + 1])]]
        if mine.numel() == 0:
            continue
        below = pind[int(pptr[h]):int(pptr[h + 1])]
        below_vo = pvo[int(pptr[h]):int(pptr[h + 1])] if pvo is not None else torch.zeros_like(below, dtype=torch.bool)
        if bool(below_vo.any()):  # the row below shares too: the same values-only tokens
            if not torch.equal(below[below_vo], mine):
                raise ValueError(f"row {h}: its values-only tokens are not those of the sharing row below")
            out[h] = -1
            continue
        start = int(torch.searchsorted(below, mine[0]))
        if not torch.equal(below[start:start + mine.numel()], mine):
            raise ValueError(f"row {h}: its values-only tokens are not whole tokens of the layer below")
        out[h] = start
    return out


def page_addresses(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, start: torch.Tensor, n: int,
                   page_size: int) -> torch.Tensor:
    """int64 ``[H, n]`` flat token addresses (``page * page_size + slot``) of each row's tokens
    ``start[h] .. start[h] + n - 1`` (row ``h``: pages ``kv_indices[kv_indptr[h]:kv_indptr[h+1]]``)."""
    t = start.to(torch.int64)[:, None] + torch.arange(n, dtype=torch.int64)[None, :]
    page = kv_indices[kv_indptr[:-1, None] + torch.div(t, page_size, rounding_mode="floor")]
    return page * page_size + t % page_size
