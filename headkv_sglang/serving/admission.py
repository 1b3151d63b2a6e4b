"""Admission: a request that will be compressed waits until the compressed pool can take it.

* ``Scheduler.run_batch`` (BEFORE): rows of a prefill batch that will be compressed start
  capturing their scoring queries (the question's, or the observation window's), are marked
  to be compressed inside the forward that completes their prompt, and reserve their
  worst-case pages.
* ``Scheduler.get_new_batch_prefill`` (BEFORE/AFTER): a waiting request that will be
  compressed is admitted only while the pool's free pages, minus the reservations of
  requests admitted but not yet compressed, cover its own worst case
  (:meth:`~headkv_sglang.kv.manager.CompressionManager.pages_bound`); otherwise it stays in
  the waiting queue (FIFO among compressed requests) until finishing requests return pages.
  With ``--tp N`` every rank must admit the same requests: the free pages are those of the
  fullest rank (one all-reduce per pass) and the bound is the busiest rank's.
* ``Req._compute_max_prefix_len`` (AFTER): a radix hit leaves the scoring queries to be
  recomputed.
* With the overlap scheduler, a waiting request sharing its first tokens with a prompt whose
  prefill result is not processed yet waits one step, so that it gets that prefix from the
  radix tree (:func:`pending_prefill_prefixes`).
"""

from __future__ import annotations

import logging

from headkv_sglang.config import AGNOSTIC_SCORINGS, KVPolicyConfig
from headkv_sglang.policies.registry import policy_class
from headkv_sglang.serving.requests import (kept_len, needs_queries, prompt_len, reconstruction, request_config,
                                           scoring_span, shared_prefix, wants_compression)
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")


def pages_bound(state: ServingState, req, cfg: KVPolicyConfig) -> int:
    """Worst-case pages of ``req`` in the compressed pool (0: it will not be compressed)."""
    m = state.manager
    seq_len = kept_len(req)
    if m is None or not wants_compression(cfg, seq_len) or shared_prefix(state, req, cfg) is not None:
        return 0  # uncompressed, or it will read a shared compressed prompt
    return m.pages_bound(cfg, seq_len)


def available_pages(state: ServingState) -> int:
    """Free pages not promised to admitted requests (the fullest rank's, under ``--tp``).

    A request's pages for its decode budget stay promised until it ends
    (:meth:`~headkv_sglang.kv.manager.CompressionManager.decode_pages_pending`). A
    prompt's reservation is released when its prefill's result is processed, but the pages are taken
    inside the forward that compresses the row (:meth:`CompressionManager.finish_compression`
    records it). With the overlap scheduler the next batch is formed in between: a row that
    has a record holds its pages already, and its reservation no longer counts. (Counting both
    made "available" negative in the soak and held requests back for nothing.) Pages of shared
    compressed prompts that no request reads count as available: they are evicted on demand. The check and
    the free count run in the scheduler's thread, in the same order on every rank."""
    m = state.manager
    unreleased = m.reserved_pages(uncommitted_only=True)
    # a compressed request's decode budget keeps its pages promised until it finishes; shared
    # compressed prompts that no request reads are freed when pages are needed (kv_share)
    available = m.allocator.free_pages + m.evictable_pages() - unreleased - m.decode_pages_pending()
    if state.min_over_ranks is not None:
        available = state.min_over_ranks(available)
    return available


def before_run_batch(state: ServingState, scheduler, batch, *args, **kwargs):
    """BEFORE Scheduler.run_batch: rows that will be compressed capture window queries."""
    state.scheduler = scheduler
    manager = state.manager
    if manager is None or batch is None or not batch.forward_mode.is_extend():
        return None
    decoding = set(id(r) for r in (getattr(batch, "decoding_reqs", None) or []))
    for req in batch.reqs:
        idx = req.kv.req_pool_idx
        if idx is None or idx in manager.records:
            continue
        cfg = request_config(state, req)
        entry = manager.pinned(idx)
        if entry is None and not manager.capturing(idx):
            entry = shared_prefix(state, req, cfg)
            if entry is not None:  # its prefill ends by reading the shared prompt (lifecycle.after_prefill)
                try:
                    manager.pin(idx, entry, at=prompt_len(req))
                except ValueError as e:  # gone since it was looked up: compress its own prompt
                    logger.warning("headkv_sglang: rid=%s cannot read a shared prompt (%s); compressing its own",
                                   req.rid, e)
                    entry = None
            if entry is not None:
                # Its own tokens after the shared prompt will be its tail: keep them its own
                # (SGLang would hand a finished prefill to the radix tree, evictable under it).
                st = manager.state(idx)
                st.req, st.restore_skip = req, bool(req.skip_radix_cache_insert)
                req.skip_radix_cache_insert = True
        if entry is not None:
            continue
        if policy_class(cfg.policy).compresses:
            span = scoring_span(state, req, cfg) if needs_queries(cfg) else None
            # the forward whose chunk completes the prompt compresses it (serving.backend);
            # a decode row of a mixed batch is not extending its prompt. A reconstructed
            # document compresses its first kept_len tokens (the copy after them is dropped).
            target = prompt_len(req)
            rec = reconstruction(req) if cfg.scoring == "reconstruct" else None
            at = (cfg, target) if id(req) not in decoding and wants_compression(cfg, kept_len(req)) else None
            manager.begin_extend(idx, req.rid, cfg.obs_window, span=span, compress_at=at,
                                 agnostic=span is not None and cfg.scoring in AGNOSTIC_SCORINGS,
                                 keep=None if rec is None else rec[0],
                                 accumulate=span is not None and cfg.scoring == "accumulated")
            manager.reserve(idx, pages_bound(state, req, cfg))
    return None


def cap_prefix_len(state: ServingState, result, req, input_len, *args, **kwargs):
    """AFTER Req._compute_max_prefix_len: leave the scoring queries to be recomputed.

    A radix hit on (nearly) the whole prompt would recompute only its last token, and the
    queries SnapKV-style policies score with (the question, or the window) would be lost.
    Capping the match (the way SGLang itself caps it for ``logprob_start_len``) makes every
    compressed request recompute its scoring span.
    """
    try:
        cfg = request_config(state, req)
    except Exception:  # never break scheduling over this
        return result
    if cfg is None or not wants_compression(cfg, kept_len(req)):
        return result
    entry = shared_prefix(state, req, cfg)
    if entry is not None:
        # it reads the shared prompt and keeps the rest of its own whole: that rest is
        # computed into its own slots (a cached copy would be the tree's, evictable under it)
        return max(0, min(result, entry.length))
    if not needs_queries(cfg):
        return result
    return max(0, min(result, scoring_span(state, req, cfg)[0]))


def before_get_new_batch_prefill(state: ServingState, scheduler, *args, **kwargs):
    """BEFORE Scheduler.get_new_batch_prefill: hold back what the compressed pool cannot take."""
    m = state.manager
    if state.held:  # never lose a request, even if the last call raised before the AFTER hook
        scheduler.waiting_queue[:0] = state.held
        state.held = []
    if m is None or not scheduler.waiting_queue:
        return None
    available = available_pages(state)
    # idle shared prompts that waiting requests will read are not free for the others (kv_share)
    wanted = {e for e in (shared_prefix(state, r, request_config(state, r)) for r in scheduler.waiting_queue)
              if e is not None and not e.refs}
    available -= sum(len(e.record.page_ids) for e in wanted)
    pending = pending_prefill_prefixes(scheduler)
    keep, held, shared = [], [], []
    for req in scheduler.waiting_queue:
        if pending and _probe(req) in pending:
            shared.append(req)  # its prefix reaches the radix tree when that prefill's result is processed
            continue
        need = pages_bound(state, req, request_config(state, req))
        if need == 0 or need > m.allocator.num_pages:
            keep.append(req)  # uncompressed, or can never fit: served uncompressed (a fallback)
        elif held or need > available:
            held.append(req)  # FIFO among compressed requests: a big one is not starved
            if not getattr(req, "_headkv_waited", False):
                req._headkv_waited = True
                state.admission_waits += 1
                logger.info("headkv_sglang: rid=%s waits for the compressed pool (needs <= %d pages, %d available)",
                            req.rid, need, available)
        else:
            keep.append(req)
            available -= need
    state.held_last_pass = len(held)
    state.prefix_waits += len(shared)
    held += shared
    if held:
        scheduler.waiting_queue = keep
        state.held = held
    return None


PREFIX_PROBE = 32  # tokens compared to tell that two prompts share a prefix


def _probe(req) -> tuple[int, ...] | None:
    ids = req.origin_input_ids
    return tuple(ids[:PREFIX_PROBE]) if len(ids) > PREFIX_PROBE else None


def pending_prefill_prefixes(scheduler) -> set[tuple[int, ...]]:
    """First tokens of the prompts in prefill batches launched but not yet result-processed.

    With SGLang's overlap scheduler the next batch is formed before the last one's result
    is processed, and a prompt enters the radix tree only then. A waiting request that shares
    a prefix with such a prompt (the branches of a frontend program's fork over one document)
    would be prefilled again from scratch; held back for that one step, it gets the prefix
    from the radix tree, as it does without overlap.
    """
    out = set()
    for batch, _ in getattr(scheduler, "result_queue", None) or ():
        if batch is None or not batch.forward_mode.is_extend():
            continue
        for req in batch.reqs:
            probe = _probe(req)
            if probe is not None:
                out.add(probe)
    out.discard(None)
    return out


def after_get_new_batch_prefill(state: ServingState, result, scheduler, *args, **kwargs):
    if state.held:
        scheduler.waiting_queue[:0] = state.held
        state.held = []
    return result
