"""CompressionManager: owns the ragged pool and every compressed request's pages.

The serving layer (``headkv_sglang.serving``) calls it at three moments:

1. during each prefill forward, :meth:`capture_queries` keeps each request's scoring
   queries per layer: its question's (a span of positions), or the last ``window`` ones;
2. once a request's prompt is complete, :meth:`compress` scores, selects and copies each
   (layer, KV head)'s kept tokens into pages, after which SGLang's token-pool slots of
   the prompt can be released. The server does it inside the prefill forward, one layer
   right after that layer's attention (:meth:`compress_in_forward`, built from the steps
   :meth:`start_compression`, :meth:`compress_layer_into`, :meth:`finish_compression`);
3. when the request's row is released (finish, abort, retraction), :meth:`free`.

Shared compressed prompts (``kv_share``): :meth:`publish` hands a compressed request's
pages to a :class:`SharedPrefix`; a later request whose prompt extends that prompt (same
config) is :meth:`pin`-ned to it before its prefill and :meth:`adopt`-s it after: its
record reads the shared pages, and the rest of its prompt stays whole in its tail. A
shared prefix is reference-counted by the rows using it; with none, it stays as cache and
is evicted, least recently used first, when pages are needed.

Decode attention over the pages is :mod:`headkv_sglang.kv.ragged` (it reads
:attr:`records`).

Requests are keyed by SGLang's ``req_pool_idx`` (the request's row in ``req_to_token``);
:meth:`free` must run whenever that row is released (finish, abort, retraction).
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.policies.base import compress_layer
from headkv_sglang.policies.budgets import planned_pages, uniform_pages
from headkv_sglang.policies.d2o import merge_dropped
from headkv_sglang.policies.decode import decode_chunk, decode_scores, select_decode
from headkv_sglang.policies.registry import build_policy, pages_upper_bound
from headkv_sglang.policies.sharding import HeadShard, ShardedPolicy, rank_pages_bound
from headkv_sglang.kv.pool import LayerPages, PageAllocator, PoolFullError, RaggedHeadKVPool, RequestPages

logger = logging.getLogger("headkv_sglang")


@dataclass
class _Capture:
    rid: str
    window: int
    # Question-aware scoring: the scoring queries are prompt positions [span[0], span[1]);
    # None: SnapKV's window, the last ``window`` queries of the prompt.
    span: tuple[int, int] | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, Hq, D]
    # compress inside the forward whose chunk ends at this prompt length (see compress_in_forward)
    compress_at: tuple[KVPolicyConfig, int] | None = None
    job: "_Job | None" = None


@dataclass
class _Job:
    """One request's compression, layer by layer (:meth:`CompressionManager.start_compression`)."""

    idx: int
    cfg: KVPolicyConfig
    seq_len: int
    policy: object
    planned: torch.Tensor | None
    w: int
    q_end: int | None
    layers: list[tuple] = field(default_factory=list)
    need: int = 0
    ms: float = 0.0  # time spent in its steps (not the forward's other work between them)


@dataclass(eq=False)
class SharedPrefix:
    """A compressed prompt that requests extending it reuse; it owns the pages."""

    key: object  # the config it was compressed under (serving: requests.share_key)
    ids: tuple[int, ...]  # its tokens
    record: RequestPages  # its pages (owned by this object in the allocator)
    refs: set = field(default_factory=set)  # rows reading it (pinned or adopted)
    last_used: int = 0
    adoptions: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # the allocator names owners in its errors
        return f"SharedPrefix({self.record.policy}, {self.length} tokens, {len(self.record.page_ids)} pages)"


class NotSmallerError(ValueError):
    """Compressing this prompt would not take less memory than its full KV."""


@dataclass
class PolicyStats:
    compressed_requests: int = 0
    held_bytes: int = 0
    full_bytes: int = 0  # what the running compressed requests' prompts take uncompressed
    kept_tokens: int = 0
    prompt_head_tokens: int = 0


class CompressionManager:
    """Compressed-pool owner for one model (one scheduler process)."""

    def __init__(self, shape: ModelShape, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: str | torch.device, *, only_if_smaller: bool = True,
                 shard: HeadShard | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 min_over_ranks: Callable[[int], int] | None = None) -> None:
        """``only_if_smaller``: :meth:`compress` refuses (NotSmallerError) a prompt whose pages
        would not take less memory than its full KV (the server's rule; tests of the
        selection math at budgets >= the prompt turn it off).

        Tensor parallelism: ``shape`` is the whole model's; ``shard`` says which of its heads
        this rank holds (its K/V and queries are those heads only), and ``gather`` all-gathers
        a layer's ``[H_local, T]`` scores over the ranks (see ``policies.sharding``). Every
        decision that must be the same on all ranks (the plan, whether compressing saves
        memory, admission's bound) is then made from the global plan, and whether the pages
        fit is agreed with ``min_over_ranks`` (a rank's pool may be fuller than another's)."""
        self.global_shape = shape
        self.shard = shard if shard is not None and shard.tp_size > 1 else None
        if self.shard is not None:
            lo, hi = self.shard.kv_heads(shape.num_kv_heads)
            qlo, qhi = self.shard.q_heads(shape.num_q_heads)
            shape = dataclasses.replace(shape, num_kv_heads=hi - lo, num_q_heads=qhi - qlo)
        self.gather = gather
        self.min_over_ranks = min_over_ranks if self.shard is not None else None
        self.shape = shape  # this rank's heads
        self.only_if_smaller = only_if_smaller
        self.pool = RaggedHeadKVPool(num_pages, page_size, shape.head_dim, dtype, device)
        self.allocator = PageAllocator(num_pages)
        self.records: dict[int, RequestPages] = {}
        # High-water mark of len(records); the server reports and resets it per read.
        self.peak_records = 0
        self._captures: dict[int, _Capture] = {}
        self._lock = threading.Lock()
        self.total_compressed: dict[str, int] = defaultdict(int)
        # since start, per policy: kept head-tokens, prompt head-tokens, held and full bytes
        self.cumulative: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.elt = torch.empty(0, dtype=dtype).element_size()
        # compress_in_forward's outcomes, taken by the serving layer's result processing
        self.compressed_in_forward: set[int] = set()
        self.failed_in_forward: dict[int, Exception] = {}
        # decode-phase compression: row -> layer -> its last decode queries [<= window, Hq, D]
        self._decode_q: dict[int, dict[int, torch.Tensor]] = {}
        # rows whose tail positions [start, end) moved into pages in a forward; the serving
        # layer frees those token-pool slots when it processes that forward's result
        self.decoded_in_forward: dict[int, tuple[int, int]] = {}
        self.decode_totals: dict[str, float] = defaultdict(float)
        # kv_share: (key, length) -> tokens -> SharedPrefix; rows pinned before their adoption
        self._shared: dict[tuple, dict[tuple, SharedPrefix]] = {}
        self._pins: dict[int, SharedPrefix] = {}
        self._adopt_at: dict[int, int | None] = {}
        self.shared_generation = 0  # bumped whenever a shared prefix appears or goes
        self.shared_totals: dict[str, int] = defaultdict(int)
        self._tick = 0

    # ------------------------------------------------------------------ prefill
    def begin_extend(self, req_pool_idx: int, rid: str, window: int,
                     span: tuple[int, int] | None = None,
                     compress_at: tuple[KVPolicyConfig, int] | None = None) -> None:
        """Start (or continue, for the same request) capturing a request's scoring queries:
        the last ``window`` of its prompt, or with ``span`` the positions ``[span[0], span[1])``
        (its question, see ``headkv_sglang.question``). ``compress_at = (cfg, seq_len)``: compress
        the request inside the forward whose chunk completes ``seq_len`` tokens
        (:meth:`compress_in_forward`)."""
        span = None if span is None else (int(span[0]), int(span[1]))
        if span is not None and not 0 <= span[0] < span[1]:
            raise ValueError(f"span must be (start, end) with 0 <= start < end, got {span}")
        cap = self._captures.get(req_pool_idx)
        if cap is None or cap.rid != rid or cap.window != window or cap.span != span:
            cap = self._captures[req_pool_idx] = _Capture(rid, window, span)
        cap.compress_at, cap.job = compress_at, None

    def capture_queries(self, layer: int, req_pool_idx: int, q: torch.Tensor, pos: int | None = None) -> None:
        """Keep this chunk's scoring queries. ``q``: ``[n, num_q_heads, head_dim]``, the queries of
        prompt positions ``[pos, pos + n)`` (``pos`` is needed with a span only)."""
        cap = self._captures.get(req_pool_idx)
        if cap is None:
            return
        prev = cap.layers.get(layer)
        q = q.detach()
        if cap.span is not None:
            if pos is None:
                raise ValueError("a span capture needs the chunk's start position (pos)")
            lo, hi = max(cap.span[0], pos), min(cap.span[1], pos + q.shape[0])
            if lo >= hi:
                return
            q = q[lo - pos:hi - pos]
            if prev is not None and lo > cap.span[0]:  # a later chunk continues the span
                q = torch.cat([prev, q])
            cap.layers[layer] = q.clone()
            return
        if prev is not None and q.shape[0] < cap.window:
            q = torch.cat([prev, q])
        cap.layers[layer] = q[-cap.window:].clone()

    def capturing(self, req_pool_idx: int) -> bool:
        return req_pool_idx in self._captures

    def drop_capture(self, req_pool_idx: int) -> None:
        self._captures.pop(req_pool_idx, None)

    def full_bytes(self, seq_len: int) -> int:
        s = self.shape
        return 2 * seq_len * s.num_layers * s.num_kv_heads * s.head_dim * self.elt

    def compress(self, req_pool_idx: int, cfg: KVPolicyConfig, seq_len: int,
                 get_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> RequestPages:
        """Compress positions ``[0, seq_len)`` of request ``req_pool_idx``.

        ``get_kv(layer)`` returns the prompt's ``k, v`` as ``[seq_len, num_kv_heads, head_dim]``.
        Raises PoolFullError (allocating nothing) when the pool cannot hold the result, and
        NotSmallerError (allocating nothing) when the pages would not be smaller than the
        prompt's full KV (page rounding: every (layer, KV head) takes whole pages). If
        writing the pages fails, they are freed before the error propagates.
        """
        job = self.start_compression(req_pool_idx, cfg, seq_len)
        for layer in range(self.shape.num_layers):
            self.compress_layer_into(job, layer, *get_kv(layer))
        return self.finish_compression(job)

    def _only_if_smaller(self, cfg: KVPolicyConfig) -> bool:
        """Whether a prompt whose pages would not be smaller than its full KV stays whole
        (NotSmallerError). Not with a decode budget: a short prompt with a long output (a
        reasoning model's chain of thought) is compressed (every token kept) so that its
        generated tokens can move into pages as it goes."""
        return self.only_if_smaller and cfg.decode_budget <= 0

    def start_compression(self, req_pool_idx: int, cfg: KVPolicyConfig, seq_len: int) -> _Job:
        """:meth:`compress` in steps: this, then :meth:`compress_layer_into` for every layer in
        order, then :meth:`finish_compression` (which allocates and writes the pages). Needs the
        scoring queries captured so far (at least layer 0's)."""
        assert req_pool_idx not in self.records, f"request row {req_pool_idx} is already compressed"
        s = self.shape
        strict = self._only_if_smaller(cfg)
        if strict and seq_len <= self.pool.page_size:  # one page per (layer, head) holds it all
            raise NotSmallerError(f"a {seq_len}-token prompt fits one {self.pool.page_size}-token page per "
                                  f"(layer, KV head): compressing cannot save memory")
        t0 = time.perf_counter()
        cap = self._captures.get(req_pool_idx)
        w = min(cfg.obs_window, seq_len)
        q_end = None
        if cap is not None and cap.span is not None:
            if cap.span[1] > seq_len:
                raise ValueError(f"scoring span {cap.span} ends after the {seq_len}-token prompt")
            q_end = cap.span[1]
        elif cap is not None and cap.layers and getattr(build_policy(cfg, self.global_shape), "needs_queries", True):
            # A radix prefix hit recomputes only the uncached suffix: the window of a
            # query-scored policy shrinks to what was actually computed (at least the last
            # token). Position-only policies (StreamingLLM, Razor) keep their window.
            captured = min(t.shape[0] for t in cap.layers.values())
            if captured < w:
                w = captured
                cfg = dataclasses.replace(cfg, window=w)
        policy = build_policy(cfg, self.global_shape)
        g = self.global_shape
        if self.shard is not None:
            policy = ShardedPolicy(policy, self.shard, g.num_kv_heads, self.gather)
        planned = policy.plan_budgets(seq_len, cfg.budget, g.num_layers, g.num_kv_heads)
        if self.shard is not None and strict:
            # decided from the global plan, the same on every rank (a rank's own pages differ)
            whole = policy.planned_global
            need = (planned_pages(whole.clamp(max=seq_len), self.pool.page_size) if whole is not None
                    else policy.inner.max_pages(seq_len, cfg.budget, g.num_layers, g.num_kv_heads,
                                                self.pool.page_size))
            if need * self.pool.page_size >= seq_len * g.num_layers * g.num_kv_heads:
                raise NotSmallerError(f"{need} pages of {self.pool.page_size} tokens (all ranks) hold at least "
                                      f"the {seq_len}-token prompt's full KV")
        return _Job(req_pool_idx, cfg, seq_len, policy, planned, w, q_end, ms=1000 * (time.perf_counter() - t0))

    def compress_layer_into(self, job: _Job, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Score and select one layer (``k, v``: ``[seq_len, num_kv_heads, head_dim]``)."""
        if layer != len(job.layers):
            raise ValueError(f"layer {layer} compressed out of order (expected {len(job.layers)})")
        t0 = time.perf_counter()
        s, policy, w = self.shape, job.policy, job.w
        cap = self._captures.get(job.idx)
        k = k[:job.seq_len].transpose(0, 1)  # [H, T, D]
        v = v[:job.seq_len].transpose(0, 1)
        qe = None
        if not getattr(policy, "needs_queries", True):
            q_win = k.new_zeros(s.num_q_heads, w, s.head_dim)
        elif job.q_end is not None:  # the question's queries (what a prefix hit left computed of them)
            if cap is None or layer not in cap.layers:
                raise RuntimeError(f"no question queries captured for row {job.idx}, layer {layer}")
            q_win, qe = cap.layers[layer].transpose(0, 1).to(k.dtype), job.q_end  # [Hq, n, D]
        else:
            if cap is None or layer not in cap.layers or cap.layers[layer].shape[0] < w:
                raise RuntimeError(f"no observation-window queries captured for row {job.idx}, layer {layer}")
            q_win = cap.layers[layer][-w:].transpose(0, 1).to(k.dtype)  # [Hq, w, D]
        prev = job.layers[-1][0] if job.layers else None
        comp = compress_layer(policy, layer, q_win, k, v, job.cfg.budget, job.planned, q_end=qe, prev=prev)
        if prev is not None:
            prev.keep = None  # only the layer below's is ever needed
        job.layers.append((comp, None, None))  # lengths, pages: finish_compression reads them (one host sync)
        job.ms += 1000 * (time.perf_counter() - t0)

    def finish_compression(self, job: _Job) -> RequestPages:
        """Allocate and write the pages of a job whose every layer is done; the request's record."""
        t0 = time.perf_counter()
        s, seq_len, cfg, req_pool_idx = self.shape, job.seq_len, job.cfg, job.idx
        if len(job.layers) != s.num_layers:
            raise ValueError(f"{len(job.layers)} of {s.num_layers} layers compressed")
        assert req_pool_idx not in self.records, f"request row {req_pool_idx} is already compressed"
        all_lengths = torch.stack([comp.lengths for comp, _, _ in job.layers]).cpu()  # every layer's, one sync
        job.need = 0
        for i, (comp, _, _) in enumerate(job.layers):
            lengths = all_lengths[i]
            pages = self.pool.pages_for(lengths)
            if comp.values_only is not None:  # PoD: whole tokens in pages, values-only ones two pages' worth a page
                vo = values_only_counts(comp)
                pages = self.pool.pages_for(lengths - vo) + (vo + 2 * self.pool.page_size - 1) // (2 * self.pool.page_size)
            job.need += int(pages.sum())
            job.layers[i] = (comp, lengths, pages)
        need = job.need
        if (self._only_if_smaller(cfg) and self.shard is None
                and need * self.pool.page_size >= seq_len * s.num_layers * s.num_kv_heads):
            raise NotSmallerError(f"{need} pages of {self.pool.page_size} tokens hold at least the "
                                  f"{seq_len}-token prompt's full KV")
        self.evict_shared(need)
        fits = self.allocator.can_allocate(need)
        if self.min_over_ranks is not None:  # compressed on every rank or on none
            fits = bool(self.min_over_ranks(int(fits)))
        with self._lock:
            if not fits or not self.allocator.can_allocate(need):
                where = "; another tensor-parallel rank's pool is full" if self.allocator.can_allocate(need) else ""
                raise PoolFullError(f"request needs {need} pages, {self.allocator.free_pages} free{where}")
            ids = self.allocator.allocate(need, owner=req_pool_idx)
        try:
            rec = self._write(req_pool_idx, cfg, seq_len, job.layers, ids)
        except BaseException:
            with self._lock:  # the pages were never recorded: give them back, not leak them
                self.allocator.free(ids, owner=req_pool_idx)
            raise
        rec.compress_ms = job.ms + 1000 * (time.perf_counter() - t0)
        if cfg.decode_budget > 0:
            rec.decode_budget, rec.decode_window = cfg.decode_budget, cfg.obs_window
            rec.decode_recency = not getattr(job.policy, "needs_queries", True)
            rec.decode_merge = cfg.policy == "d2o" and cfg.d2o_merge == "on"
        self.records[req_pool_idx] = rec
        self.peak_records = max(self.peak_records, len(self.records))
        self.drop_capture(req_pool_idx)
        self.total_compressed[cfg.policy] += 1
        c = self.cumulative[cfg.policy]
        c[0] += rec.kept_tokens
        c[1] += seq_len * s.num_layers * s.num_kv_heads
        c[2] += rec.held_bytes(self.pool.bytes_per_page)
        c[3] += self.full_bytes(seq_len)
        return rec

    def pages_bound(self, cfg: KVPolicyConfig, seq_len: int) -> int:
        """Pages this rank may need at most for a ``seq_len``-token prompt under ``cfg`` (the
        same number on every rank: admission must decide alike on all of them), the generated
        tokens its decode budget keeps included."""
        g, ps = self.global_shape, self.pool.page_size
        decode = self.decode_pages_bound(cfg.decode_budget)
        if self.shard is None:
            return pages_upper_bound(cfg, g, seq_len, ps) + decode
        return rank_pages_bound(build_policy(cfg, g), seq_len, cfg.budget, g.num_layers, g.num_kv_heads,
                                ps, self.shard) + decode

    def decode_pages_bound(self, decode_budget: int) -> int:
        """Pages that a decode budget adds to a request's at most: per (layer, KV head) row,
        ``ceil((p + n) / ps) - ceil(p / ps) <= ceil(n / ps)`` for ``n <= decode_budget``."""
        return uniform_pages(self.shape.num_layers * self.shape.num_kv_heads, decode_budget, self.pool.page_size)

    def decode_pages_pending(self) -> int:
        """Pages the running compressed requests' decode budgets may still take."""
        return sum(self.decode_pages_bound(r.decode_budget) - r.decode_pages
                   for r in list(self.records.values()) if r.decode_budget > 0)

    # ------------------------------------------------------------------ inside the forward
    def compress_in_forward(self, layer: int, req_pool_idx: int, end: int,
                            get_kv: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Called by the attention backend after layer ``layer``'s attention of a prefill chunk
        that ends at position ``end``: if that completes the prompt the request asked to be
        compressed at (``begin_extend(compress_at=)``), compress this layer now (``get_kv()``:
        its K/V of positions ``[0, end)``), and after the last layer write the pages.

        The outcome is left for the serving layer's result processing: the record in
        :attr:`records` (and in :attr:`compressed_in_forward`), or the exception in
        :attr:`failed_in_forward` (nothing allocated, the request stays whole).
        """
        cap = self._captures.get(req_pool_idx)
        if cap is None or cap.compress_at is None or cap.compress_at[1] != end:
            return
        try:
            if layer == 0:
                cap.job = self.start_compression(req_pool_idx, cap.compress_at[0], end)
            if cap.job is None:
                return  # layer 0 of this forward never started it
            self.compress_layer_into(cap.job, layer, *get_kv())
            if layer == self.shape.num_layers - 1:
                self.finish_compression(cap.job)  # drops the capture
                self.compressed_in_forward.add(req_pool_idx)
        except Exception as e:  # the serving layer reports it; the request stays whole
            self.failed_in_forward[req_pool_idx] = e
            cap.compress_at, cap.job = None, None

    # ------------------------------------------------------------------ decode phase
    def capture_decode_query(self, layer: int, req_pool_idx: int, q: torch.Tensor) -> None:
        """Keep a compressed request's decode query of ``layer`` (``q``: ``[Hq, D]``) when it
        has a decode budget: its last ``decode_window`` rank its generated tokens."""
        rec = self.records.get(req_pool_idx)
        if rec is None or rec.decode_budget <= 0 or rec.decode_recency:
            return
        per = self._decode_q.setdefault(req_pool_idx, {})
        prev = per.get(layer)
        q = q.detach()[None]
        per[layer] = q.clone() if prev is None else torch.cat([prev, q])[-rec.decode_window:]

    def decode_due(self, req_pool_idx: int, seq_len: int) -> tuple[int, int] | None:
        """Tail positions ``[start, end)`` to move into pages in the decode forward whose newest
        token is at ``seq_len - 1`` (all of the tail but its last ``decode_window``), or None
        while the tail is within its window plus a chunk."""
        rec = self.records.get(req_pool_idx)
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
        ``tail_start = end``, also left in :attr:`decoded_in_forward` for the serving layer to
        free the positions' token slots. Returns the new record, or None when the pool cannot
        take the growth (nothing changed; retried a chunk later).

        Runs after the forward's last layer: every layer's attention has read the old record,
        and pages are only added, never freed, so its rows are rewritten in place.
        """
        t0 = time.perf_counter()
        rec = self.records[req_pool_idx]
        if rec.tail_start != start or not start < end:
            raise ValueError(f"row {req_pool_idx}: tail starts at {rec.tail_start}, asked to move [{start}, {end})")
        ps, D = self.pool.page_size, self.pool.head_dim
        n_old, n_move = rec.decode_kept, end - start
        n_new = min(rec.decode_budget, n_old + n_move)
        plans, grow = [], 0
        for lp in rec.layers:
            prompt = lp.lengths - n_old  # each row's prompt tokens
            have = lp.kv_indptr[1:] - lp.kv_indptr[:-1]
            add = ((prompt + n_new + ps - 1) // ps - have).clamp(min=0)
            plans.append((prompt, have, add))
            grow += int(add.sum())
        self.evict_shared(grow)
        fits = self.allocator.can_allocate(grow)
        if self.min_over_ranks is not None:  # the same records on every rank
            fits = bool(self.min_over_ranks(int(fits)))
        if not fits:
            rec.decode_retry_at = end + rec.decode_window + decode_chunk(rec.decode_budget)
            self.decode_totals["pool_full"] += 1
            return None
        kflat, vflat = self.pool.k_pages.view(-1, D), self.pool.v_pages.view(-1, D)
        device = kflat.device
        queries = self._decode_q.get(req_pool_idx, {})
        chosen, thresholds, merged = [], list(rec.decode_thresholds or [None] * len(rec.layers)), 0
        for layer, (lp, (prompt, _, _)) in enumerate(zip(rec.layers, plans)):
            k_new, v_new = get_kv(layer)
            k = k_new.to(device, self.pool.dtype).transpose(0, 1)  # [H, n_move, D]
            v = v_new.to(device, self.pool.dtype).transpose(0, 1)
            if n_old:
                old = page_addresses(lp.kv_indptr, lp.kv_indices, prompt, n_old, ps).to(device)
                k, v = torch.cat([kflat[old], k], 1), torch.cat([vflat[old], v], 1)
            if n_new < k.shape[1]:
                if rec.decode_recency:
                    scores = decode_scores(k.new_zeros(0, 0, D), k, scale, recency=True)
                elif layer not in queries:
                    raise RuntimeError(f"no decode queries captured for row {req_pool_idx}, layer {layer}")
                else:
                    scores = decode_scores(queries[layer].transpose(0, 1).to(device), k, scale)
                idx = select_decode(scores, n_new)
                sel = idx[..., None].expand(-1, -1, D)
                k_all, v_all = k, v
                k, v = torch.gather(k, 1, sel), torch.gather(v, 1, sel)
                if rec.decode_merge:  # D2O: the dropped ones merge into their most similar kept one
                    H = k.shape[0]
                    keep = torch.zeros(k_all.shape[:2], dtype=torch.bool, device=device).scatter_(1, idx, True)
                    indptr = torch.arange(H + 1, dtype=torch.int64) * n_new
                    st: dict = {}
                    kf, vf = merge_dropped(k_all, v_all, keep, k.reshape(-1, D), v.reshape(-1, D), indptr,
                                           gather=self.gather, prev_threshold=thresholds[layer], stats=st)
                    k, v = kf.view(H, n_new, D), vf.view(H, n_new, D)
                    thresholds[layer] = st.get("threshold", thresholds[layer])
                    merged += st.get("merged", 0)
            chosen.append((k, v))
        with self._lock:
            ids = self.allocator.allocate(grow, owner=req_pool_idx)
        try:
            layers, cursor = [], 0
            for lp, (prompt, have, add), (k, v) in zip(rec.layers, plans, chosen):
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
                kflat[dest] = k.reshape(-1, D)
                vflat[dest] = v.reshape(-1, D)
                new = dataclasses.replace(lp, kv_indptr=kv_indptr, kv_indices=kv_indices, lengths=prompt + n_new)
                new._page_size = ps
                layers.append(new)
        except BaseException:
            with self._lock:
                self.allocator.free(ids, owner=req_pool_idx)
            raise
        new_rec = dataclasses.replace(
            rec, layers=layers, page_ids=rec.page_ids + ids, tail_start=end,
            decode_kept=n_new, decode_pages=rec.decode_pages + grow, decode_compressions=rec.decode_compressions + 1,
            decode_thresholds=tuple(thresholds) if rec.decode_merge else ())
        with self._lock:
            self.records[req_pool_idx] = new_rec
        self.decoded_in_forward[req_pool_idx] = (start, end)
        rows = len(rec.layers) * self.shape.num_kv_heads
        t = self.decode_totals
        t["compressions"] += 1
        t["tokens_moved"] += n_move  # positions that left SGLang's pool
        t["head_tokens_dropped"] += (n_old + n_move - n_new) * rows
        t["head_tokens_merged"] += merged
        t["ms"] += 1000 * (time.perf_counter() - t0)
        return new_rec

    def decode_failed(self, req_pool_idx: int, e: Exception) -> None:
        """:meth:`compress_decode` raised ``e`` (nothing was allocated): the request's decode
        compression stops, its tail grows whole in SGLang's pool from now on."""
        rec = self.records.get(req_pool_idx)
        if rec is not None:
            rec.decode_retry_at = 1 << 62
        self.decode_totals["errors"] += 1
        logger.error("headkv_sglang: row %d: decode-phase compression failed; its tail stays whole",
                     req_pool_idx, exc_info=(type(e), e, e.__traceback__))

    def _write(self, req_pool_idx: int, cfg: KVPolicyConfig, seq_len: int, layers: list[tuple],
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
            whole_pages = self.pool.pages_for(whole)
            kv_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(whole_pages, 0, out=kv_indptr[1:])
            kv_indices = torch.tensor(ids[cursor:cursor + int(whole_pages.sum())], dtype=torch.int64)
            cursor += int(whole_pages.sum())
            self.pool.write(kv_indices.to(self.pool.k_pages.device), kv_indptr, whole, k_flat, v_flat, tok_indptr)
            lp = LayerPages(kv_indptr=kv_indptr, kv_indices=kv_indices, lengths=whole,
                            comp_k=comp.comp_k, comp_v=comp.comp_v, comp_count=comp.comp_count)
            if vo is not None:
                vo_pages = pages - whole_pages
                lp.vo_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
                torch.cumsum(vo_pages, 0, out=lp.vo_indptr[1:])
                lp.vo_indices = torch.tensor(ids[cursor:cursor + int(vo_pages.sum())], dtype=torch.int64)
                cursor += int(vo_pages.sum())
                lp.vo_lengths, lp.vo_start = vo_len, values_only_starts(comp, prev)
                vo_tok = torch.zeros_like(comp.indptr)
                torch.cumsum(vo_len.to(vo_tok.device), 0, out=vo_tok[1:])
                self.pool.write_values(lp.vo_indices, lp.vo_indptr, vo_len, comp.v_flat[vo.to(comp.v_flat.device)],
                                       vo_tok)
            lp._page_size = self.pool.page_size
            rec.layers.append(lp)
            prev = comp
        assert cursor == len(ids), f"wrote {cursor} of {len(ids)} pages"
        return rec

    # ------------------------------------------------------------------ shared prefixes
    def find_shared(self, key: object, ids) -> SharedPrefix | None:
        """The longest shared prefix compressed under ``key`` whose tokens begin ``ids``."""
        if self.shard is not None:  # eviction is per rank: ranks could disagree on what exists
            return None
        best = None
        for (k, n), table in self._shared.items():
            if n <= len(ids) and (best is None or n > best.length) and k == key:
                best = table.get(tuple(ids[:n]), best)
        return best

    def publish(self, req_pool_idx: int, key: object, ids) -> SharedPrefix | None:
        """Make request ``req_pool_idx``'s compressed prompt (its tokens: ``ids``) a shared
        prefix that it keeps reading. None (the request keeps its pages) if the request
        decodes into its pages, or runs tensor-parallel, or the same prefix is already shared."""
        rec = self.records.get(req_pool_idx)
        ids = tuple(int(t) for t in ids)
        if rec is None or rec.shared is not None or rec.decode_budget or self.shard is not None:
            return None
        if len(ids) != rec.prompt_len:
            raise ValueError(f"row {req_pool_idx}: {len(ids)} tokens given for a {rec.prompt_len}-token prompt")
        table = self._shared.setdefault((key, len(ids)), {})
        if ids in table:
            return None
        with self._lock:
            entry = SharedPrefix(key, ids, rec, refs={req_pool_idx}, last_used=self._next_tick())
            self.allocator.transfer(rec.page_ids, req_pool_idx, entry)
            table[ids] = entry
            self.records[req_pool_idx] = dataclasses.replace(rec, page_ids=[], shared=entry)
        self.shared_generation += 1
        self.shared_totals["published"] += 1
        return entry

    def pin(self, req_pool_idx: int, entry: SharedPrefix, at: int | None = None) -> None:
        """Row ``req_pool_idx`` will adopt ``entry`` once its prefill is done: keep it. ``at``:
        the prompt length whose prefill forward adopts it (:meth:`adopt_in_forward`)."""
        if self._shared.get((entry.key, entry.length), {}).get(entry.ids) is not entry:
            raise ValueError(f"{entry!r} is not shared any more")
        old = self._pins.get(req_pool_idx)
        if old is not None and old is not entry:
            old.refs.discard(req_pool_idx)
        entry.refs.add(req_pool_idx)
        self._pins[req_pool_idx] = entry
        self._adopt_at[req_pool_idx] = at

    def adopt_in_forward(self, layer: int, req_pool_idx: int, end: int) -> None:
        """Called by the attention backend after each layer of a prefill chunk ending at ``end``:
        after the last layer of the chunk that completes a pinned row's prompt, the row reads
        its shared prompt (the next forward sees its record, as a compressed row's). The
        outcome is left as :meth:`compress_in_forward` leaves it."""
        if layer != self.shape.num_layers - 1 or self._adopt_at.get(req_pool_idx) != end:
            return
        try:
            self.adopt(req_pool_idx, end)
            self.compressed_in_forward.add(req_pool_idx)
        except Exception as e:  # the serving layer reports it; the request stays whole
            self.failed_in_forward[req_pool_idx] = e

    def pinned(self, req_pool_idx: int) -> SharedPrefix | None:
        return self._pins.get(req_pool_idx)

    def adopt(self, req_pool_idx: int, seq_len: int) -> RequestPages:
        """Row ``req_pool_idx`` (pinned) reads its shared prefix from now on; positions from the
        prefix's end to ``seq_len`` are its tail."""
        entry = self._pins.pop(req_pool_idx)
        self._adopt_at.pop(req_pool_idx, None)
        assert req_pool_idx not in self.records, f"request row {req_pool_idx} is already compressed"
        if seq_len < entry.length:
            entry.refs.discard(req_pool_idx)
            raise ValueError(f"a {seq_len}-token prompt cannot adopt the {entry.length}-token prefix {entry!r}")
        src = entry.record
        rec = RequestPages(prompt_len=src.prompt_len, policy=src.policy, budget=src.budget, layers=src.layers,
                           kept_tokens=src.kept_tokens, shared=entry)
        self.records[req_pool_idx] = rec
        self.peak_records = max(self.peak_records, len(self.records))
        self.drop_capture(req_pool_idx)
        entry.adoptions += 1
        entry.last_used = self._next_tick()
        self.shared_totals["adopted"] += 1
        return rec

    def _release_shared(self, req_pool_idx: int, entry: SharedPrefix | None) -> None:
        if entry is not None:
            entry.refs.discard(req_pool_idx)
            entry.last_used = self._next_tick()

    def evictable_pages(self) -> int:
        """Pages of shared prefixes no row reads (they are freed when pages are needed)."""
        return sum(len(e.record.page_ids) for t in self._shared.values() for e in t.values() if not e.refs)

    def evict_shared(self, need: int) -> int:
        """Free unread shared prefixes, least recently used first, until ``need`` pages are
        free (or none is left to free). Returns the pages freed."""
        if self.allocator.can_allocate(need):
            return 0
        idle = sorted((e for t in self._shared.values() for e in t.values() if not e.refs),
                      key=lambda e: e.last_used)
        freed = 0
        for e in idle:
            if self.allocator.can_allocate(need):
                break
            freed += self.drop_shared(e)
        return freed

    def drop_shared(self, entry: SharedPrefix) -> int:
        """Free an unread shared prefix's pages; returns how many."""
        if entry.refs:
            raise ValueError(f"{entry!r} is read by rows {sorted(entry.refs)}")
        table = self._shared.get((entry.key, entry.length), {})
        if table.get(entry.ids) is not entry:
            return 0
        with self._lock:
            del table[entry.ids]
            if not table:
                del self._shared[(entry.key, entry.length)]
            self.allocator.free(entry.record.page_ids, owner=entry)
        self.shared_generation += 1
        self.shared_totals["evicted"] += 1
        return len(entry.record.page_ids)

    def clear_shared(self) -> int:
        """Free every unread shared prefix (SGLang's cache flush); returns the pages freed."""
        return sum(self.drop_shared(e) for t in list(self._shared.values()) for e in list(t.values()) if not e.refs)

    def shared_prefixes(self) -> list[SharedPrefix]:
        return [e for t in self._shared.values() for e in t.values()]

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    # ------------------------------------------------------------------ ownership
    def free(self, req_pool_idx: int) -> bool:
        """Release a request row's pages (and capture). True if it held pages."""
        self.drop_capture(req_pool_idx)
        self.compressed_in_forward.discard(req_pool_idx)
        self.failed_in_forward.pop(req_pool_idx, None)
        self._decode_q.pop(req_pool_idx, None)
        self.decoded_in_forward.pop(req_pool_idx, None)
        self._release_shared(req_pool_idx, self._pins.pop(req_pool_idx, None))
        self._adopt_at.pop(req_pool_idx, None)
        with self._lock:
            rec = self.records.pop(req_pool_idx, None)
            if rec is None:
                return False
            self.allocator.free(rec.page_ids, owner=req_pool_idx)
        self._release_shared(req_pool_idx, rec.shared)
        return True

    def check_integrity(self) -> None:
        with self._lock:
            owned = {idx: rec.page_ids for idx, rec in self.records.items() if rec.page_ids}
            for e in self.shared_prefixes():
                owned[e] = e.record.page_ids
                readers = {i for i, r in self.records.items() if r.shared is e} | {
                    i for i, p in self._pins.items() if p is e}
                assert e.refs == readers, f"{e!r}: refs {sorted(e.refs)}, read by rows {sorted(readers)}"
            self.allocator.check_integrity(owned)

    # ------------------------------------------------------------------ observability
    def stats(self) -> dict:
        per: dict[str, PolicyStats] = defaultdict(PolicyStats)
        bpp = self.pool.bytes_per_page
        with self._lock:
            for rec in self.records.values():
                st = per[rec.policy]
                st.held_bytes += rec.held_bytes(bpp)
                st.full_bytes += self.full_bytes(rec.prompt_len)
                st.kept_tokens += rec.kept_tokens
                st.prompt_head_tokens += rec.prompt_len * self.shape.num_layers * self.shape.num_kv_heads
            shared = self.shared_prefixes()
            for e in shared:  # pages read by running requests count once, with their policy
                if e.refs:
                    per[e.record.policy].held_bytes += e.record.held_bytes(bpp)
            running = len(self.records)
            free_pages = self.allocator.free_pages
        policies = {}
        for name in set(per) | set(self.total_compressed):
            st = per[name]
            policies[name] = {
                "compressed_requests_total": self.total_compressed.get(name, 0),
                "running_compressed_requests": sum(1 for r in self.records.values() if r.policy == name),
                "held_bytes": st.held_bytes,
                "full_kv_bytes": st.full_bytes,
                "ratio": (st.full_bytes / st.held_bytes) if st.held_bytes else None,
                "kept_fraction": (st.kept_tokens / st.prompt_head_tokens) if st.prompt_head_tokens else None,
                "cumulative_kept_fraction": (self.cumulative[name][0] / self.cumulative[name][1])
                if self.cumulative[name][1] else None,
                "cumulative_ratio": (self.cumulative[name][3] / self.cumulative[name][2])
                if self.cumulative[name][2] else None,
            }
        return {
            "pool": {
                "num_pages": self.allocator.num_pages,
                "page_size": self.pool.page_size,
                "free_pages": free_pages,
                "used_pages": self.allocator.num_pages - free_pages,
                "bytes_per_page": bpp,
                "capacity_bytes": self.allocator.num_pages * bpp,
            },
            "running_compressed_requests": running,
            "policies": policies,
            # kv_share: compressed prompts shared across requests (now, and totals since start)
            "shared": {"prefixes": len(shared), "in_use": sum(1 for e in shared if e.refs),
                       "pages": sum(len(e.record.page_ids) for e in shared),
                       "idle_pages": sum(len(e.record.page_ids) for e in shared if not e.refs),
                       "readers": sum(len(e.refs) for e in shared),
                       **{f"{k}_total": int(self.shared_totals.get(k, 0)) for k in ("published", "adopted", "evicted")}},
            # decode-phase compression since start (policies/decode.py)
            "decode": {**{k: int(self.decode_totals.get(k, 0)) for k in
                          ("compressions", "tokens_moved", "head_tokens_dropped", "head_tokens_merged", "pool_full",
                           "errors")},
                       "ms": round(self.decode_totals.get("ms", 0.0), 1),
                       "pages_promised": self.decode_pages_pending()},
        }


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
    layer below (``prev``): its tokens before the first values-only position. Those tokens
    must be whole there and the same positions (what PoD's ``link_layer`` guarantees)."""
    H = comp.indptr.numel() - 1
    out = torch.zeros(H, dtype=torch.int64)
    if prev is None:
        raise ValueError("values-only tokens in the first layer: there is no layer below to share with")
    vo, ind, ptr = comp.values_only.cpu(), comp.indices.cpu(), comp.indptr.cpu()
    pind, pptr = prev.indices.cpu(), prev.indptr.cpu()
    for h in range(H):
        mine = ind[int(ptr[h]):int(ptr[h + 1])][vo[int(ptr[h]):int(ptr[h + 1])]]
        if mine.numel() == 0:
            continue
        below = pind[int(pptr[h]):int(pptr[h + 1])]
        start = int(torch.searchsorted(below, mine[0]))
        if not torch.equal(below[start:start + mine.numel()], mine):
            raise ValueError(f"row {h}: its values-only tokens are not whole tokens of the layer below")
        if prev.values_only is not None and bool(prev.values_only.cpu()[int(pptr[h]) + start:
                                                                         int(pptr[h]) + start + mine.numel()].any()):
            raise ValueError(f"row {h}: shares with a row that is itself values-only")
        out[h] = start
    return out


def page_addresses(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, start: torch.Tensor, n: int,
                   page_size: int) -> torch.Tensor:
    """int64 ``[H, n]`` flat token addresses (``page * page_size + slot``) of each row's tokens
    ``start[h] .. start[h] + n - 1`` (row ``h``: pages ``kv_indices[kv_indptr[h]:kv_indptr[h+1]]``)."""
    t = start.to(torch.int64)[:, None] + torch.arange(n, dtype=torch.int64)[None, :]
    page = kv_indices[kv_indptr[:-1, None] + torch.div(t, page_size, rounding_mode="floor")]
    return page * page_size + t % page_size
