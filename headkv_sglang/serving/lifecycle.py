"""A compressed request's life: compressed once its prompt is complete, freed with its row.

* the prefill forward that completes a prompt compresses it, layer by layer
  (``serving.backend``, :meth:`~headkv_sglang.kv.manager.CompressionManager.compress_in_forward`);
* ``process_batch_result_prefill`` (BEFORE): note which requests complete their prompt
  in this batch (SGLang decrements ``inflight_middle_chunks`` while processing); a
  ``kv_share`` request compressed in the forward shares its compressed prompt.
* ``process_batch_result_prefill`` (AFTER): give the prompt's token slots of the requests
  compressed in the forward back: the radix tree keeps them as *evictable* cache (prefix
  hits still work) and the request stops pinning them. A request the forward did not
  compress (it failed there: counted, the request stays whole) is reported; one the
  forward never reached is compressed here, as before.
* ``process_batch_result_decode`` (BEFORE): a decode forward that moved generated tokens
  of a request into its pages (decode-phase compression, ``policies/decode.py``) leaves
  their token slots to free here, before SGLang's own handling of the step (which may
  finish the request and free the rest of its tail).
* ``ReqToTokenPool.free_rows`` (BEFORE): finish, abort and retraction free the pages.

With SGLang's overlap scheduler the next batch is launched before this result
processing runs; it already sees the forward's records, so its rows of these requests are
compressed rows (their prompt slots are still pinned until released here).
"""

from __future__ import annotations

import logging

import torch

from headkv_sglang.kv.manager import CompressionManager, NotSmallerError
from headkv_sglang.kv.pool import PoolFullError
from headkv_sglang.kv.request_state import FORWARD_OK
from headkv_sglang.serving import metrics
from headkv_sglang.serving.requests import (kept_len, needs_queries, prompt_ids, reconstruction, request_config,
                                           share_key, wants_compression)
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")


def before_prefill(state: ServingState, processor, batch, *args, **kwargs):
    """BEFORE process_batch_result_prefill: note which requests complete their prompt now, and
    share the ``kv_share`` prompts the forward compressed (before SGLang can free a row that
    ends with its prefill)."""
    if state.manager is None or batch is None:
        return None
    state.completing = {id(req) for req in batch.reqs if req.inflight_middle_chunks <= 0}
    for req in batch.reqs:
        idx = req.kv.req_pool_idx
        if id(req) in state.completing and state.manager.forward_outcome(idx) is FORWARD_OK:
            if publish(state, req, idx, state.manager) and getattr(req.sampling_params, "max_new_tokens", None) == 0:
                # a document ("compress this"): it ends with this prefill, never reaching after_prefill
                rec = state.manager.records[idx]
                report(state, req, idx, request_config(state, req), state.manager, rec, "forward",
                       int(req.extend_end or rec.prompt_len))
    return None


def after_prefill(state: ServingState, result, processor, batch, *args, **kwargs):
    """AFTER process_batch_result_prefill: compress requests whose prompt is now complete."""
    manager = state.manager
    if manager is None:
        return result
    tree_cache = processor.tree_cache
    decoding = set(id(r) for r in (getattr(batch, "decoding_reqs", None) or []))
    released = False
    completing, state.completing = state.completing, set()
    for req in batch.reqs:
        idx = req.kv.req_pool_idx
        done = id(req) in completing
        if idx is not None and done:
            manager.release_reservation(idx)
        if idx is None or not done or id(req) in decoding or req.finished() or req.is_retracted:
            continue
        cfg = request_config(state, req)
        seq_len = int(req.extend_end or 0)
        if manager.pinned(idx) is not None:  # kv_share: the forward did not adopt it (it should have)
            try:
                rec = manager.adopt(idx, seq_len)
            except Exception as e:
                stays_whole(state, req, idx, manager, e)
                continue
            release(state, req, idx, cfg, seq_len, tree_cache, manager, rec, where="shared")
            released = True
            continue
        outcome = manager.take_forward_outcome(idx)
        if outcome is FORWARD_OK:  # compressed by the forward: release its prompt slots
            rec = manager.records[idx]
            read = rec.shared is not None and not manager.state(idx).published
            # (a reconstructed document's record holds the document, not its copy after it)
            if rec.prompt_len in (seq_len, kept_len(req)) or read and rec.prompt_len <= seq_len:
                release(state, req, idx, cfg, seq_len, tree_cache, manager, rec, where="shared" if read else "forward")
                released = True
                continue
            logger.error("headkv_sglang: rid=%s was compressed at %d tokens, its prefill ended at %d: "
                         "serving it uncompressed", req.rid, rec.prompt_len, seq_len)
            manager.free(idx)
            state.count(state.fallbacks, "error")
            continue
        if isinstance(outcome, Exception):  # the forward failed (on this rank or another): it stays whole
            stays_whole(state, req, idx, manager, outcome)
            continue
        if idx in manager.records:
            continue
        if not wants_compression(cfg, kept_len(req)):
            manager.drop_capture(idx)
            continue
        if compress_and_release(state, req, idx, cfg, seq_len, tree_cache, manager):
            released = True
    if released and state.scheduler is not None:
        # SGLang marks the running batch full when a prefill did not fit and only clears
        # the mark when a request finishes; compression just returned memory, so let the
        # scheduler try to admit waiting requests again.
        state.scheduler.running_batch.batch_is_full = False
    return result


def publish(state: ServingState, req, idx: int, manager: CompressionManager) -> bool:
    """``kv_share``: make ``req``'s compressed prompt shared (True if it now is). Done when the
    forward that compressed it is processed, before SGLang may free the row: a request that
    ends with its prefill (``max_new_tokens: 0``, "compress this document") leaves it shared."""
    cfg = request_config(state, req)
    rec = manager.records.get(idx)
    if not cfg.share or rec is None or rec.shared is not None:
        return False
    ids = prompt_ids(req)[:rec.prompt_len]
    return len(ids) == rec.prompt_len and manager.publish(idx, share_key(cfg), ids) is not None


def compress_and_release(state: ServingState, req, idx: int, cfg, seq_len: int, tree_cache,
                         manager: CompressionManager) -> bool:
    """Compress ``req``'s prompt into pages and release its token slots. False: it stays whole.

    The path for a request whose prefill forward did not compress it."""
    req_to_token = tree_cache.req_to_token_pool.req_to_token
    kv_pool = tree_cache.token_to_kv_pool_allocator.get_kvcache()
    rpass = reconstruction(req)  # a reconstructed document: the document, not its copy
    n = seq_len if rpass is None else min(seq_len, rpass[0])
    slots = req_to_token[idx, :n].to(torch.int64)

    def get_kv(layer: int):
        return kv_pool.get_key_buffer(layer)[slots], kv_pool.get_value_buffer(layer)[slots]

    try:
        rec = manager.compress(idx, cfg, n, get_kv)
    except Exception as e:
        stays_whole(state, req, idx, manager, e)
        return False
    release(state, req, idx, cfg, seq_len, tree_cache, manager, rec, where="result")
    return True


def stays_whole(state: ServingState, req, idx: int, manager: CompressionManager, e: Exception) -> None:
    """Compression of ``req`` raised ``e`` (nothing was allocated): it keeps its full KV."""
    manager.drop_capture(idx)
    if isinstance(e, NotSmallerError):
        # By design, not a fallback: page rounding would make the "compressed" copy at
        # least as large as the prompt's full KV (a short prompt).
        state.count(state.not_compressed, "not_smaller")
        logger.info("headkv_sglang: rid=%s stays uncompressed: %s", req.rid, e)
    elif isinstance(e, PoolFullError):
        # Correct but uncompressed: the request keeps its full KV in SGLang's pool.
        state.count(state.fallbacks, "pool_full")
        logger.warning("headkv_sglang: rid=%s stays uncompressed: compressed pool full (%s)", req.rid, e)
    else:  # never take the server down: serve this request uncompressed
        state.count(state.fallbacks, "error")
        logger.error("headkv_sglang: rid=%s stays uncompressed: compression failed", req.rid,
                     exc_info=(type(e), e, e.__traceback__))


def release(state: ServingState, req, idx: int, cfg, seq_len: int, tree_cache, manager: CompressionManager,
            rec, where: str) -> None:
    """Give a compressed request's prompt slots back to SGLang, and report it (``where``: it was
    compressed in the prefill ``"forward"`` or in the ``"result"`` processing, or reads a
    ``"shared"`` compressed prompt).

    The slots given back are those of ``[0, rec.prompt_len)``: the whole prompt, or for a
    request reading a shared prompt that prompt's part of it (the rest stays its own, as its
    tail). With ``kv_share``, a request that compressed its own prompt shares it."""
    req_to_token = tree_cache.req_to_token_pool.req_to_token
    # seq_len from here on: the positions now in pages, whose slots go back (the whole prompt,
    # or the shared part of it); full_len: the whole prompt
    full_len, seq_len = seq_len, rec.prompt_len
    if where != "shared" and publish(state, req, idx, manager):  # compressed after the forward
        rec = manager.records[idx]
    st = manager.state(idx)
    # Give the prompt's token-pool slots back: hand the whole prompt to the radix tree (a
    # later request sharing it gets a prefix hit), then drop this request's lock so it is
    # evictable cache. Anything the request still owns beyond the tree's part (a partial
    # page, or everything when the radix cache is off) is freed now and marked protected so
    # that the release at finish frees only the decode tail.
    if st.restore_skip is not None:  # its own tokens stayed out of the tree (admission.before_run_batch)
        req.skip_radix_cache_insert = st.restore_skip
    if not req.skip_radix_cache_insert:
        try:
            tree_cache.checkpoint(req, up_to=seq_len)
        except Exception:  # the prompt is then freed below instead of cached
            logger.exception("headkv_sglang: rid=%s: inserting the prompt into the radix tree failed", req.rid)
    protected = req.kv.cache_protected_len
    if protected < seq_len:
        tree_cache.token_to_kv_pool_allocator.free(req_to_token[idx, protected:seq_len])
        req.kv.cache_protected_len = seq_len
    tree_cache.unlock(req.lock)
    req.lock = None
    st.req, st.restore_skip, st.released = req, bool(req.skip_radix_cache_insert), True
    # The prompt slots may be evicted and reused from now on: nothing may insert this
    # request's stale row into the tree.
    req.skip_radix_cache_insert = True
    report(state, req, idx, cfg, manager, rec, where, full_len)


def report(state: ServingState, req, idx: int, cfg, manager: CompressionManager, rec, where: str,
           full_len: int) -> None:
    """Log a compressed request and keep its record for ``/server_info`` (``recent_requests``)
    and the metrics. ``full_len``: its whole prompt (a shared prompt's reader: more than the
    pages hold; a reconstructed document: with the pass that repeated it)."""
    st = manager.state(idx)
    seq_len = rec.prompt_len
    shared = ("published" if st.published else "read") if rec.shared is not None else None
    full = manager.full_bytes(seq_len)
    bpp = manager.pool.bytes_per_page
    pages_bytes = rec.shared.record.held_bytes(bpp) if rec.shared is not None else rec.held_bytes(bpp)
    ratio, ms = full / max(pages_bytes, 1), rec.compress_ms
    logger.info(
        "headkv_sglang: %s rid=%s policy=%s budget=%d%s prompt=%d tokens kept=%.1f%% "
        "held=%.2f MB full=%.2f MB ratio=%.1fx in %.0f ms",
        f"reads a shared compressed prompt ({seq_len} of its {full_len} tokens):" if shared == "read"
        else "compressed and shares" if shared else "compressed",
        req.rid, cfg.policy, rec.budget, f" ({cfg.budget_label} of the prompt)" if cfg.budget_ratio else "", seq_len,
        100.0 * rec.kept_tokens / (seq_len * manager.shape.num_layers * manager.shape.num_kv_heads),
        pages_bytes / 2**20, full / 2**20, ratio, ms,
    )
    state.remember(str(req.rid), {
        "policy": cfg.policy, "budget": rec.budget, "budget_asked": cfg.budget_label, "prompt_tokens": full_len,
        "kept_head_tokens": int(rec.kept_tokens), "held_bytes": int(rec.held_bytes(bpp)), "full_bytes": int(full),
        "ratio": round(ratio, 2), "compress_ms": round(ms, 1), "compressed_in": where,
        # kv_share: "published" (its compressed prompt is shared now) or "read" (it reads
        # one), the shared prompt's tokens and bytes (held_bytes: its own pages, then 0)
        "shared": shared,
        "shared_tokens": seq_len if rec.shared is not None else None,
        "shared_bytes": int(pages_bytes) if rec.shared is not None else None,
        # the prompt positions whose queries ranked its tokens (None: position-based policy)
        "scoring": cfg.scoring if needs_queries(cfg) else None,
        "scoring_span": list(st.span) if needs_queries(cfg) and st.span else None,
        # question-agnostic scores: ranked across all (layer, KV head) rows ("global") or within
        # each row's policy budget ("policy"), as the compression did (a reader: its publisher's)
        "selection": rec.selection,
        # kv_scoring "reconstruct": the tokens of the pass that repeated the document (prefilled
        # with it, then dropped)
        "reconstruction_tokens": full_len - seq_len if cfg.scoring == "reconstruct" else None,
    })
    metrics.update(state, cfg.policy)


def before_decode(state: ServingState, processor, batch, *args, **kwargs):
    """BEFORE process_batch_result_decode: free the token slots that decode-phase compression
    moved into pages, and mark them as no longer the request's (``cache_protected_len``: SGLang
    frees a request's own KV from there on when it finishes or is retracted).

    A row retracted or aborted between the forward and this call freed its whole tail with
    its row (``before_free_rows`` then dropped the entry), so nothing is freed twice."""
    manager = state.manager
    if manager is None or not manager.has_moved():
        return None
    allocator = processor.tree_cache.token_to_kv_pool_allocator
    req_to_token = processor.tree_cache.req_to_token_pool.req_to_token
    for st, start, end in manager.take_moved():
        if not st.released:
            continue
        idx, req = st.idx, st.req
        if req.kv.cache_protected_len != start:
            logger.error("headkv_sglang: rid=%s: its own KV starts at %d, decode compression moved [%d, %d): "
                         "slots left to SGLang", req.rid, req.kv.cache_protected_len, start, end)
            state.count(state.fallbacks, "error")
            continue
        allocator.free(req_to_token[idx, start:end])
        req.kv.cache_protected_len = end
        rec = st.record
        report = state.recent.get(str(req.rid))
        if rec is not None and report is not None:
            report.update(decode_compressions=rec.decode_compressions, decode_kept=rec.decode_kept,
                          decode_budget=rec.decode_budget, tail_start=rec.tail_start,
                          held_bytes=int(rec.held_bytes(manager.pool.bytes_per_page)))
    metrics.update(state)
    return None


def after_flush_cache(state: ServingState, result, scheduler, *args, **kwargs):
    """AFTER Scheduler.flush_cache: a flush that emptied SGLang's cache frees the shared
    compressed prompts too (no request reads them: the server is idle).

    ``--kv-memory shared``: SGLang's flush took every token slot back, the slots lent to
    compressed pages included; the pages freed here return their chunks to nobody, and the
    allocator forgets its chunks (giving them back again would count them twice)."""
    m = state.manager
    if not result or m is None:
        return result
    from headkv_sglang.kv.shared_memory import BorrowingPageAllocator

    if isinstance(m.allocator, BorrowingPageAllocator):
        with m.allocator.source_cleared():
            m.clear_shared()
        metrics.update(state)
    elif m.clear_shared():
        metrics.update(state)
    return result


def before_free_rows(state: ServingState, pool, indices, *args, **kwargs):
    """BEFORE ReqToTokenPool.free_rows: a finished, aborted or retracted row frees its pages."""
    manager = state.manager
    if manager is None:
        return None
    freed = False
    for idx in list(indices):
        st = manager.release_row(int(idx))  # its state goes: reservation, pin, pages
        if st is None:
            continue
        freed |= st.record is not None
        if st.req is not None and st.restore_skip is not None:
            # a pinned row that never read its shared prompt (aborted, retracted, done at
            # prefill), or a released one: a retracted request re-enters the radix tree normally
            st.req.skip_radix_cache_insert = st.restore_skip
    if freed:
        metrics.update(state)
    return None
