"""SGLang coupling of the scheduler process: attention backend, pool sizing, compression trigger.

Everything here runs inside SGLang's scheduler process (which also runs the model on a
single device). The hooks are installed by ``plugin.register`` when ``--kv-policy`` is
active:

* ``DefaultPoolConfigurator.calculate_pool_sizes*`` (AFTER): move ``--kv-pool-fraction`` of
  SGLang's KV token capacity to the compressed pool (same bytes: one token slot holds
  ``layers × kv_heads`` head-tokens).
* ``Scheduler.run_batch`` (BEFORE): rows of a prefill batch that will be compressed start
  capturing their observation-window queries.
* the ``torch_native`` backend factory (REPLACE): :class:`HeadKVTorchNativeBackend`, which
  captures observation-window queries at prefill and attends over compressed prompt ⊕
  decode tail for compressed rows.
* ``SchedulerBatchResultProcessor.process_batch_result_prefill`` (AFTER): once a request's
  prompt is complete, compress it, then give its prompt slots back: the radix tree keeps
  them as *evictable* cache (prefix hits still work) and the request stops pinning them.
* ``ReqToTokenPool.free_rows`` (BEFORE): finish, abort and retraction free the pages.
* ``Scheduler.get_new_batch_prefill`` (BEFORE/AFTER): admission accounts for the
  compressed pool. A waiting request that will be compressed is admitted only while the
  pool's free pages, minus the worst case of requests admitted but not yet compressed,
  cover its own worst case (:func:`pages_upper_bound`); otherwise it stays in the waiting
  queue (FIFO among compressed requests) until finishing requests return pages.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Any

import torch

from headkv_sglang.kv.manager import CompressionManager, pages_upper_bound
from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.kv.pool import PoolFullError

logger = logging.getLogger("headkv_sglang")


class _State:
    """Per-process state of the serving layer (one scheduler = one model = one pool)."""

    cfg: KVPolicyConfig | None = None
    shape: ModelShape | None = None
    pool_tokens: int = 0  # token slots moved from SGLang's pool to ours
    token_pool_tokens: int = 0
    manager: CompressionManager | None = None
    # req_pool_idx -> (req, its original skip_radix_cache_insert)
    compressed_reqs: dict[int, tuple[Any, bool]] = {}
    fallbacks: dict[str, int] = {}
    backend_installed: bool = False
    scheduler: Any = None
    # admission: req_pool_idx -> worst-case pages of a request admitted but not yet compressed
    reserved: dict[int, int] = {}
    held: list[Any] = []  # waiting requests held back during one get_new_batch_prefill call
    admission_waits: int = 0  # requests that had to wait for compressed-pool pages
    held_last_pass: int = 0  # requests held back by the last admission pass
    # rid -> what compression did to it (the newest RECENT_REQUESTS; for clients' reports)
    recent: "OrderedDict[str, dict]" = OrderedDict()


RECENT_REQUESTS = 512


STATE = _State()


class _Metrics:
    """Prometheus gauges (only with SGLang's --enable-metrics, which sets PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["policy"]
        self.compressed = Counter("sglang:headkv_compressed_requests", "Requests whose prompt KV was compressed", labels)
        self.held = Gauge("sglang:headkv_held_bytes", "KV bytes held in the compressed pool by running requests",
                          labels, multiprocess_mode="mostrecent")
        self.full = Gauge("sglang:headkv_full_kv_bytes", "KV bytes the same prompts take uncompressed",
                          labels, multiprocess_mode="mostrecent")
        self.ratio = Gauge("sglang:headkv_compression_ratio", "full_kv_bytes / held_bytes of running requests",
                           labels, multiprocess_mode="mostrecent")
        self.used_pages = Gauge("sglang:headkv_pool_used_pages", "Pages in use in the compressed pool",
                                multiprocess_mode="mostrecent")
        self.policies: set[str] = set()

    def update(self, manager: CompressionManager, compressed_policy: str | None = None) -> None:
        if compressed_policy:
            self.compressed.labels(policy=compressed_policy).inc()
        st = manager.stats()
        self.used_pages.set(st["pool"]["used_pages"])
        self.policies |= set(st["policies"])
        for pol in self.policies:
            d = st["policies"].get(pol, {})
            self.held.labels(policy=pol).set(d.get("held_bytes", 0))
            self.full.labels(policy=pol).set(d.get("full_kv_bytes", 0))
            self.ratio.labels(policy=pol).set(d.get("ratio") or 0)


_metrics: _Metrics | None = None


def update_metrics(compressed_policy: str | None = None) -> None:
    global _metrics
    import os

    if STATE.manager is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        if _metrics is None:
            _metrics = _Metrics()
        _metrics.update(STATE.manager, compressed_policy)
    except Exception:  # metrics must never break serving
        logger.exception("headkv_sglang: metrics update failed")


def request_config(req) -> KVPolicyConfig | None:
    """The effective config of a request (server default + its custom_params), cached on it."""
    cached = getattr(req, "_headkv_cfg", None)
    if cached is not None:
        return cached
    cfg = STATE.cfg
    params = getattr(req.sampling_params, "custom_params", None) or {}
    try:
        cfg = cfg.with_request(params)
    except ConfigError:  # validated at the HTTP layer already; be safe
        logger.exception("invalid kv_* custom_params reached the scheduler; using server defaults")
    req._headkv_cfg = cfg
    return cfg


def wants_compression(cfg: KVPolicyConfig, seq_len: int) -> bool:
    return cfg.policy != "full" and seq_len >= max(cfg.min_prompt, 1)


# ---------------------------------------------------------------------------- pool sizing
def scale_pool_sizes(result, *args, **kwargs):
    cfg = STATE.cfg
    total = result.max_total_num_tokens
    moved = int(total * cfg.pool_fraction)
    result.max_total_num_tokens = total - moved
    STATE.pool_tokens = moved
    STATE.token_pool_tokens = total - moved
    logger.info(
        "headkv_sglang: KV capacity %d tokens -> SGLang token pool %d + compressed pool %d token-equivalents "
        "(--kv-pool-fraction %.2f)", total, total - moved, moved, cfg.pool_fraction,
    )
    return result


def before_run_batch(scheduler, batch, *args, **kwargs):
    """BEFORE Scheduler.run_batch: tell the manager which rows capture window queries."""
    STATE.scheduler = scheduler
    manager = STATE.manager
    if manager is None or batch is None or not batch.forward_mode.is_extend():
        return None
    for req in batch.reqs:
        idx = req.kv.req_pool_idx
        if idx is None or idx in manager.records:
            continue
        cfg = request_config(req)
        if cfg.policy != "full":
            manager.begin_extend(idx, req.rid, cfg.obs_window)
            STATE.reserved.setdefault(idx, _pages_bound(req, cfg))
    return None


# ---------------------------------------------------------------------------- prefix cap
# Policies that score tokens with the observation window's queries; the others select by
# position only and need no recomputed window.
_QUERY_POLICIES = ("headkv", "snapkv", "pyramidkv", "adakv")


def cap_prefix_len(result, req, input_len, *args, **kwargs):
    """AFTER Req._compute_max_prefix_len: leave the observation window to be recomputed.

    A radix hit on (nearly) the whole prompt would recompute only its last token, and the
    window's queries — what SnapKV-style policies score with — would be one token. Capping
    the match (the way SGLang itself caps it for ``logprob_start_len``) makes every
    compressed request recompute at least its last ``window`` tokens: ~32 tokens of
    prefill for a full-quality selection.
    """
    try:
        cfg = request_config(req)
    except Exception:  # never break scheduling over this
        return result
    if cfg is None or cfg.policy not in _QUERY_POLICIES or not wants_compression(cfg, input_len):
        return result
    return max(0, min(result, input_len - cfg.obs_window))


# ---------------------------------------------------------------------------- admission
def _prompt_len(req) -> int:
    return len(req.origin_input_ids) + len(req.output_ids or ())


def _pages_bound(req, cfg: KVPolicyConfig) -> int:
    m = STATE.manager
    seq_len = _prompt_len(req)
    if m is None or not wants_compression(cfg, seq_len):
        return 0
    return pages_upper_bound(cfg, m.shape, seq_len, m.pool.page_size)


def before_get_new_batch_prefill(scheduler, *args, **kwargs):
    """BEFORE Scheduler.get_new_batch_prefill: hold back what the compressed pool cannot take."""
    m = STATE.manager
    if STATE.held:  # never lose a request, even if the last call raised before the AFTER hook
        scheduler.waiting_queue[:0] = STATE.held
        STATE.held = []
    if m is None or not scheduler.waiting_queue:
        return None
    available = m.allocator.free_pages - sum(STATE.reserved.values())
    keep, held = [], []
    for req in scheduler.waiting_queue:
        need = _pages_bound(req, request_config(req))
        if need == 0 or need > m.allocator.num_pages:
            keep.append(req)  # uncompressed, or can never fit: served uncompressed (a fallback)
        elif held or need > available:
            held.append(req)  # FIFO among compressed requests: a big one is not starved
            if not getattr(req, "_headkv_waited", False):
                req._headkv_waited = True
                STATE.admission_waits += 1
                logger.info("headkv_sglang: rid=%s waits for the compressed pool (needs <= %d pages, %d available)",
                            req.rid, need, available)
        else:
            keep.append(req)
            available -= need
    STATE.held_last_pass = len(held)
    if held:
        scheduler.waiting_queue = keep
        STATE.held = held
    return None


def after_get_new_batch_prefill(result, scheduler, *args, **kwargs):
    if STATE.held:
        scheduler.waiting_queue[:0] = STATE.held
        STATE.held = []
    return result


# ---------------------------------------------------------------------------- backend
def _make_backend_class():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    class HeadKVTorchNativeBackend(TorchNativeAttnBackend):
        """torch_native attention + compressed rows (the CPU reference serving path)."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            shape = STATE.shape
            num_pages = max(1, STATE.pool_tokens * shape.num_layers * shape.num_kv_heads // STATE.cfg.page_size)
            dtype = self.token_to_kv_pool.get_key_buffer(0).dtype
            STATE.manager = CompressionManager(shape, num_pages, STATE.cfg.page_size, dtype, self.device)
            self.manager = STATE.manager
            logger.info(
                "headkv_sglang: compressed pool %d pages x %d tokens (%.1f MB), policy %s, budget %d",
                num_pages, STATE.cfg.page_size, num_pages * self.manager.pool.bytes_per_page / 2**20,
                STATE.cfg.policy, STATE.cfg.budget,
            )

        def _compressed_rows(self, forward_batch) -> list[int]:
            recs = self.manager.records
            if not recs:
                return []
            idxs = forward_batch.req_pool_indices.tolist()
            return [i for i, idx in enumerate(idxs) if idx in recs]

        def _attend_compressed(self, i, q_, o_, layer, forward_batch, start_q, n_q, prefix_len):
            idx = int(forward_batch.req_pool_indices[i])
            rec = self.manager.records[idx]
            seq_len = int(forward_batch.seq_lens[i])
            slots = self.req_to_token_pool.req_to_token[idx, rec.prompt_len:seq_len]
            k_tail = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[slots]
            v_tail = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[slots]
            q_pos = torch.arange(prefix_len, prefix_len + n_q)
            o_[start_q:start_q + n_q] = self.manager.attend(
                layer.layer_id, idx, q_[start_q:start_q + n_q], k_tail, v_tail, q_pos, layer.scaling
            )

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            rows = self._compressed_rows(forward_batch)
            q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            if not rows:
                o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            else:  # a compressed request in an extend batch (mixed chunk): its prefix lives in pages
                o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
                o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
                starts = [0]
                for n in forward_batch.extend_seq_lens_cpu:
                    starts.append(starts[-1] + int(n))
                for i in rows:
                    self._attend_compressed(i, q_, o_, layer, forward_batch, starts[i],
                                            int(forward_batch.extend_seq_lens_cpu[i]),
                                            int(forward_batch.extend_prefix_lens_cpu[i]))
            # observation window: keep each capturing row's last queries of this chunk
            if self.manager._captures:
                start = 0
                idxs = forward_batch.req_pool_indices.tolist()
                for i, n in enumerate(forward_batch.extend_seq_lens_cpu):
                    n = int(n)
                    if idxs[i] in self.manager._captures:
                        self.manager.capture_queries(layer.layer_id, idxs[i], q_[start:start + n])
                    start += n
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            rows = self._compressed_rows(forward_batch)
            if not rows:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
                )
            o = torch.empty_like(q) if layer.qk_head_dim == layer.v_head_dim else q.new_empty(
                (q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
            q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
            compressed = set(rows)
            plain = [i for i in range(forward_batch.batch_size) if i not in compressed]
            if plain:
                sel = torch.tensor(plain, dtype=torch.int64, device=q.device)
                o_plain = torch.empty_like(o_[sel])
                self._run_sdpa_forward_decode(
                    q_[sel], o_plain,
                    self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                    self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                    self.req_to_token_pool.req_to_token,
                    forward_batch.req_pool_indices[sel], forward_batch.seq_lens[sel],
                    scaling=layer.scaling, enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=False,
                )
                o_[sel] = o_plain
            for i in rows:
                self._attend_compressed(i, q_, o_, layer, forward_batch, i, 1, int(forward_batch.seq_lens[i]) - 1)
            return o

    return HeadKVTorchNativeBackend


def create_backend(model_runner):
    STATE.backend_installed = True
    return _make_backend_class()(model_runner)


# ---------------------------------------------------------------------------- compression trigger
def before_prefill(processor, batch, *args, **kwargs):
    """BEFORE process_batch_result_prefill: note which requests complete their prompt now.

    SGLang decrements ``inflight_middle_chunks`` of a chunked request while processing
    the result, so after processing a middle chunk is indistinguishable from a last one.
    """
    if STATE.manager is None or batch is None:
        return None
    for req in batch.reqs:
        req._headkv_prefill_done = req.inflight_middle_chunks <= 0
    return None


def after_prefill(result, processor, batch, *args, **kwargs):
    """AFTER process_batch_result_prefill: compress requests whose prompt is now complete."""
    manager = STATE.manager
    if manager is None:
        return result
    tree_cache = processor.tree_cache
    decoding = set(id(r) for r in (getattr(batch, "decoding_reqs", None) or []))
    released = False
    for req in batch.reqs:
        idx = req.kv.req_pool_idx
        done = getattr(req, "_headkv_prefill_done", False)
        req._headkv_prefill_done = False
        if idx is not None and done:
            STATE.reserved.pop(idx, None)
        if (idx is None or not done or id(req) in decoding or req.finished() or req.is_retracted
                or idx in manager.records):
            continue
        cfg = request_config(req)
        seq_len = int(req.extend_end or 0)
        if not wants_compression(cfg, seq_len):
            manager.drop_capture(idx)
            continue
        if _compress_and_release(req, idx, cfg, seq_len, tree_cache, manager):
            released = True
    if released and STATE.scheduler is not None:
        # SGLang marks the running batch full when a prefill did not fit and only clears
        # the mark when a request finishes; compression just returned memory, so let the
        # scheduler try to admit waiting requests again.
        STATE.scheduler.running_batch.batch_is_full = False
    return result


def _compress_and_release(req, idx, cfg, seq_len, tree_cache, manager) -> bool:
    req_to_token = tree_cache.req_to_token_pool.req_to_token
    kv_pool = tree_cache.token_to_kv_pool_allocator.get_kvcache()
    slots = req_to_token[idx, :seq_len].to(torch.int64)
    t0 = time.perf_counter()

    def get_kv(layer: int):
        return kv_pool.get_key_buffer(layer)[slots], kv_pool.get_value_buffer(layer)[slots]

    try:
        rec = manager.compress(idx, cfg, seq_len, get_kv)
    except PoolFullError as e:
        # Correct but uncompressed: the request keeps its full KV in SGLang's pool.
        STATE.fallbacks["pool_full"] = STATE.fallbacks.get("pool_full", 0) + 1
        manager.drop_capture(idx)
        logger.warning("headkv_sglang: rid=%s stays uncompressed: compressed pool full (%s)", req.rid, e)
        return False
    except Exception:  # never take the server down: serve this request uncompressed
        STATE.fallbacks["error"] = STATE.fallbacks.get("error", 0) + 1
        manager.drop_capture(idx)
        logger.exception("headkv_sglang: rid=%s stays uncompressed: compression failed", req.rid)
        return False
    # Give the prompt's token-pool slots back: hand the whole prompt to the radix tree (a
    # later request sharing it gets a prefix hit), then drop this request's lock so it is
    # evictable cache. Anything the request still owns beyond the tree's part (a partial
    # page, or everything when the radix cache is off) is freed now and marked protected so
    # that the release at finish frees only the decode tail.
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
    STATE.compressed_reqs[idx] = (req, bool(req.skip_radix_cache_insert))
    # The prompt slots may be evicted and reused from now on: nothing may insert this
    # request's stale row into the tree.
    req.skip_radix_cache_insert = True
    full = manager.full_bytes(seq_len)
    held = rec.held_bytes(manager.pool.bytes_per_page)
    ratio, ms = full / max(held, 1), 1000 * (time.perf_counter() - t0)
    logger.info(
        "headkv_sglang: compressed rid=%s policy=%s budget=%d prompt=%d tokens kept=%.1f%% "
        "held=%.2f MB full=%.2f MB ratio=%.1fx in %.0f ms",
        req.rid, cfg.policy, cfg.budget, seq_len,
        100.0 * rec.kept_tokens / (seq_len * manager.shape.num_layers * manager.shape.num_kv_heads),
        held / 2**20, full / 2**20, ratio, ms,
    )
    STATE.recent[str(req.rid)] = {
        "policy": cfg.policy, "budget": cfg.budget, "prompt_tokens": seq_len,
        "kept_head_tokens": int(rec.kept_tokens), "held_bytes": int(held), "full_bytes": int(full),
        "ratio": round(ratio, 2), "compress_ms": round(ms, 1),
    }
    while len(STATE.recent) > RECENT_REQUESTS:
        STATE.recent.popitem(last=False)
    update_metrics(cfg.policy)
    return True


def before_free_rows(pool, indices, *args, **kwargs):
    manager = STATE.manager
    if manager is None:
        return None
    freed = False
    for idx in list(indices):
        STATE.reserved.pop(int(idx), None)
        freed |= manager.free(int(idx))
        entry = STATE.compressed_reqs.pop(int(idx), None)
        if entry is not None:  # a retracted request re-enters the radix tree normally
            req, orig_skip = entry
            req.skip_radix_cache_insert = orig_skip
    if freed:
        update_metrics()
    return None


def plugin_state() -> dict:
    m = STATE.manager
    out: dict[str, Any] = {
        "policy": STATE.cfg.policy if STATE.cfg else None,
        "config": STATE.cfg.__dict__ if STATE.cfg else None,
        "backend_installed": STATE.backend_installed,
        "token_pool_tokens": STATE.token_pool_tokens,
        "compressed_pool_token_equivalents": STATE.pool_tokens,
        "fallbacks": dict(STATE.fallbacks),
        "recent_requests": dict(STATE.recent),
        "admission": {"waits": STATE.admission_waits, "held_last_pass": STATE.held_last_pass,
                      "reserved_pages": sum(STATE.reserved.values())},
    }
    if m is not None:
        out.update(m.stats())
        out["peak_running_compressed_requests_since_last_read"] = max(m.peak_records, len(m.records))
        m.peak_records = len(m.records)
        try:
            m.check_integrity()
            out["integrity"] = "ok"
        except AssertionError as e:
            out["integrity"] = f"FAILED: {e}"
    return out
