"""Compressing a prompt: scoring, selecting and writing each (layer, KV head)'s kept tokens.

The :class:`~headkv_sglang.kv.manager.CompressionManager`'s prefill job, in steps that the
server runs inside the prefill forward, one layer right after that layer's attention
(:meth:`PrefillCompression.compress_in_forward`), and that :meth:`~PrefillCompression.compress`
runs in one call: :meth:`~PrefillCompression.start_compression`, then
:meth:`~PrefillCompression.compress_layer_into` for every layer in order, then
:meth:`~PrefillCompression.finish_compression` (which allocates, writes and commits the pages).
Under ``--tp`` every step ends with a vote of the ranks (:mod:`headkv_sglang.kv.ranks`):
a failure on any rank leaves the request whole on all of them.
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from headkv_sglang.config import KVPolicyConfig
from headkv_sglang.kv.pool import PoolFullError, RequestPages
from headkv_sglang.kv.ranks import agreed, borrow_together
from headkv_sglang.kv.request_state import CAPTURES, FORWARD_OK, Job, Phase
from headkv_sglang.kv.tables import values_only_counts, write_prompt_pages
from headkv_sglang.policies.base import compress_layer
from headkv_sglang.policies.budgets import global_budgets, planned_pages
from headkv_sglang.policies.registry import build_policy, pages_upper_bound
from headkv_sglang.policies.sharding import ShardedPolicy, rank_pages_bound


class NotSmallerError(ValueError):
    """Compressing this prompt would not take less memory than its full KV."""


class PrefillCompression:
    """The prefill half of :class:`~headkv_sglang.kv.manager.CompressionManager` (a mixin: it
    uses the manager's pool, allocator, shapes, request states and votes)."""

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
        job = self.vote.run(lambda: self.start_compression(req_pool_idx, cfg, seq_len))
        for layer in range(self.shape.num_layers):
            self.vote.run(lambda layer=layer: self.compress_layer_into(job, layer, *get_kv(layer)))
        return self.finish_compression(job)

    def _only_if_smaller(self, cfg: KVPolicyConfig) -> bool:
        """Whether a prompt whose pages would not be smaller than its full KV stays whole
        (NotSmallerError). Not with a decode budget: a short prompt with a long output (a
        reasoning model's chain of thought) is compressed (every token kept) so that its
        generated tokens can move into pages as it goes."""
        return self.only_if_smaller and cfg.decode_budget <= 0

    def start_compression(self, req_pool_idx: int, cfg: KVPolicyConfig, seq_len: int) -> Job:
        """:meth:`compress` in steps: this, then :meth:`compress_layer_into` for every layer in
        order, then :meth:`finish_compression` (which allocates and writes the pages). Needs the
        scoring queries captured so far (at least layer 0's)."""
        st = self._states.get(req_pool_idx)
        assert st is None or st.record is None, f"request row {req_pool_idx} is already compressed ({st!r})"
        strict = self._only_if_smaller(cfg)
        if strict and seq_len <= self.pool.page_size:  # one page per (layer, head) holds it all
            raise NotSmallerError(f"a {seq_len}-token prompt fits one {self.pool.page_size}-token page per "
                                  f"(layer, KV head): compressing cannot save memory")
        t0 = time.perf_counter()
        w = min(cfg.obs_window, seq_len)
        q_end = None
        capturing = st is not None and st.phase in CAPTURES
        if capturing and st.agnostic:
            pass  # scored by the accumulated masses (compress_layer_into); the window is the last w kept tokens
        elif capturing and st.span is not None:
            if st.span[1] > seq_len:
                raise ValueError(f"scoring span {st.span} ends after the {seq_len}-token prompt")
            q_end = st.span[1]
        elif capturing and st.queries and getattr(build_policy(cfg, self.global_shape), "needs_queries", True):
            # A radix prefix hit recomputes only the uncached suffix: the window of a
            # query-scored policy shrinks to what was actually computed (at least the last
            # token). Position-only policies (StreamingLLM, Razor) keep their window.
            captured = min(t.shape[0] for t in st.queries.values())
            if captured < w:
                w = captured
                cfg = dataclasses.replace(cfg, window=w)
        policy = build_policy(cfg, self.global_shape)
        g = self.global_shape
        if self.shard is not None:
            policy = ShardedPolicy(policy, self.shard, g.num_kv_heads, self._gather,
                                   gather_queries=self._gather_queries)
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
        # question-agnostic scores ranked across every row at once (KVzip): the budgets need every
        # layer's scores, so the layers are compressed after the last one's attention
        by_mass = capturing and st.agnostic and getattr(policy, "needs_queries", True)
        return Job(req_pool_idx, cfg, seq_len, policy, planned, w, q_end,
                   select_global=by_mass and cfg.agnostic_select == "global", ranked_by_mass=by_mass,
                   ms=1000 * (time.perf_counter() - t0))

    def _mass(self, job: Job, st, layer: int) -> torch.Tensor:
        """Layer ``layer``'s question-agnostic masses over the job's ``seq_len`` tokens."""
        mass = st.mass.get(layer)
        if mass is None:
            raise RuntimeError(f"no question-agnostic scores captured for row {job.idx}, layer {layer}")
        if mass.shape[-1] < job.seq_len:  # tokens no computed query saw (a radix hit's prefix)
            mass = torch.nn.functional.pad(mass, (0, job.seq_len - mass.shape[-1]))
        return mass[..., :job.seq_len]

    def _plan_global(self, job: Job, st) -> torch.Tensor:
        """Every layer's budgets of a global selection (:func:`global_budgets` over the policy's
        scores of every layer's masses; the total is the policy's plan's)."""
        scores = torch.stack([job.policy.scores_from_mass(self._mass(job, st, layer))
                              for layer in range(self.shape.num_layers)])
        total = (int(job.planned.sum()) if job.planned is not None
                 else self.shape.num_layers * self.shape.num_kv_heads * min(job.cfg.budget, job.seq_len))
        return global_budgets(scores, total, job.policy.window_size)

    def compress_layer_into(self, job: Job, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Score and select one layer (``k, v``: ``[seq_len, num_kv_heads, head_dim]``)."""
        if layer != len(job.layers):
            raise ValueError(f"layer {layer} compressed out of order (expected {len(job.layers)})")
        t0 = time.perf_counter()
        s, policy, w = self.shape, job.policy, job.w
        st = self._states.get(job.idx)
        queries = st.queries if st is not None and st.phase in CAPTURES else {}
        k = k[:job.seq_len].transpose(0, 1)  # [H, T, D]
        v = v[:job.seq_len].transpose(0, 1)
        qe, mass, budgets = None, None, None
        agnostic = st is not None and st.phase in CAPTURES and st.agnostic
        if agnostic and getattr(policy, "needs_queries", True):
            mass = self._mass(job, st, layer)
            if job.select_global:
                if job.budgets is None:
                    job.budgets = self._plan_global(job, st)
                budgets = job.budgets[layer]
            q_win = k.new_zeros(s.num_q_heads, w, s.head_dim)  # unused: the masses rank
        elif not getattr(policy, "needs_queries", True):
            q_win = k.new_zeros(s.num_q_heads, w, s.head_dim)
        elif job.q_end is not None:  # the question's queries (what a prefix hit left computed of them)
            if layer not in queries:
                raise RuntimeError(f"no question queries captured for row {job.idx}, layer {layer}")
            q_win, qe = queries[layer].transpose(0, 1).to(k.dtype), job.q_end  # [Hq, n, D]
        else:
            if layer not in queries or queries[layer].shape[0] < w:
                raise RuntimeError(f"no observation-window queries captured for row {job.idx}, layer {layer}")
            q_win = queries[layer][-w:].transpose(0, 1).to(k.dtype)  # [Hq, w, D]
        prev = job.layers[-1][0] if job.layers else None
        comp = compress_layer(policy, layer, q_win, k, v, job.cfg.budget, job.planned, q_end=qe, prev=prev,
                              mass=mass, budgets=budgets)
        if prev is not None:
            prev.keep = None  # only the layer below's is ever needed
        job.layers.append((comp, None, None))  # lengths, pages: finish_compression reads them (one host sync)
        job.ms += 1000 * (time.perf_counter() - t0)

    def finish_compression(self, job: Job) -> RequestPages:
        """Allocate and write the pages of a job whose every layer is done; commit the request's
        record once every rank has (the ranks' vote: a failure anywhere frees what was
        written, on every rank)."""
        t0 = time.perf_counter()
        s, seq_len, cfg, req_pool_idx = self.shape, job.seq_len, job.cfg, job.idx
        if len(job.layers) != s.num_layers:
            raise ValueError(f"{len(job.layers)} of {s.num_layers} layers compressed")
        st = self._states.get(req_pool_idx)
        assert st is None or st.record is None, f"request row {req_pool_idx} is already compressed ({st!r})"
        ids, rec, err = None, None, None
        try:
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
            with self._lock:
                self.shared.evict(need)
            borrow_together(self.vote, self.allocator, need)  # --kv-memory shared under --tp: every rank alike
            with self._lock:
                if not self.allocator.can_allocate(need):
                    raise PoolFullError(f"request needs {need} pages, {self.allocator.free_pages} free")
                ids = self.allocator.allocate(need, owner=req_pool_idx)
            rec = write_prompt_pages(self.pool, cfg, seq_len, job.layers, ids)
        except Exception as e:
            err = e
        try:
            if err is None or not agreed(err):
                self.vote.close(err)
            else:  # a peer's failure, learnt in this step's collective: every rank knows already
                raise err
        except BaseException:
            if ids is not None:
                with self._lock:  # the pages were never recorded: give them back, not leak them
                    self.allocator.free(ids, owner=req_pool_idx)
            raise
        rec.compress_ms = job.ms + 1000 * (time.perf_counter() - t0)
        if job.ranked_by_mass:
            rec.selection = "global" if job.select_global else "policy"
        if cfg.decode_budget > 0:
            rec.decode_budget, rec.decode_window = cfg.decode_budget, cfg.obs_window
            rec.decode_recency = not getattr(job.policy, "needs_queries", True)
            rec.decode_merge = cfg.policy == "d2o" and cfg.d2o_merge == "on"
        st = self._state(req_pool_idx)
        st.record, st.job, st.compress_at = rec, None, None
        st.queries, st.mass = {}, {}
        self._set_phase(st, Phase.COMPRESSED)
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

    # ------------------------------------------------------------------ inside the forward
    def compress_in_forward(self, layer: int, req_pool_idx: int, end: int,
                            get_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Called by the attention backend after layer ``layer``'s attention of a prefill chunk
        that ends at position ``end``: if that completes the prompt the request asked to be
        compressed at (``begin_extend(compress_at=)``), compress this layer now (``get_kv(layer)``:
        a layer's K/V of positions ``[0, end)``), and after the last layer write the pages. A
        global selection (``agnostic_select`` "global") needs every layer's scores first: it
        compresses every layer after the last one's attention (their K/V are in the token slots).

        Each layer is one step of the ranks' vote. The outcome is left for the serving
        layer's result processing (:meth:`take_forward_outcome`): the request COMPRESSED, or
        WHOLE with the exception (nothing allocated, on every rank).
        """
        st = self._states.get(req_pool_idx)
        if st is None or st.phase not in CAPTURES or st.compress_at is None or st.compress_at[1] != end:
            return
        last = layer == self.shape.num_layers - 1
        try:
            err = None
            try:
                if layer == 0:
                    # a reconstruction pass compresses the document, not its repetition
                    n = end if st.keep is None else min(st.keep, end)
                    st.job = self.start_compression(req_pool_idx, st.compress_at[0], n)
                    self._set_phase(st, Phase.COMPRESSING)
                if st.job is None:
                    return  # layer 0 of this forward never started it
                if not st.job.select_global:
                    self.compress_layer_into(st.job, layer, *get_kv(layer))
                elif last:
                    for i in range(self.shape.num_layers):
                        self.compress_layer_into(st.job, i, *get_kv(i))
            except Exception as e:
                if agreed(e):
                    raise
                err = e
            if not last or err is not None:
                self.vote.close(err)
            else:
                self.finish_compression(st.job)  # votes before committing
                st.outcome = FORWARD_OK
        except Exception as e:  # the serving layer reports it; the request stays whole
            self._to_whole(st, e)
