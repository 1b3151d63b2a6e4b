"""HeadKVAttnBackend: SGLang's own attention backend, plus the compressed rows.

The headkv backend *wraps* the backend SGLang would have used — ``flashinfer`` on CUDA,
``torch_native`` on CPU — and delegates to it everything that is not a compressed row:
all of prefill (chunked prefill, radix prefix hits) and every uncompressed row of a
decode or mixed batch, including writing every new token's K/V into SGLang's pool. It
adds only:

* capturing the observation-window queries of requests that will be compressed, during
  their extend, and compressing each layer of a request right after that layer's attention
  in the chunk that completes its prompt (so compression is part of the prefill forward);
  and
* attention for compressed rows (:class:`~headkv_sglang.kv.ragged.RaggedAttention`:
  prompt pages ⊕ decode tail ⊕ Razor's compensation), written over the inner backend's
  output for those rows.

In a decode batch the inner backend sees each compressed row as a 1-token row (its
newest token; its prompt slots have been released), so it spends no time on the prompt
the ragged kernel attends.

CUDA graphs: with the FlashInfer kernel, a decode graph is captured with a graphed ragged
kernel (fixed buffers, ``max_bs`` rows, padding rows masked) after the inner backend's
attention, and every replay's metadata plans it for the batch's compressed rows
(:meth:`HeadKVAttnBackend.init_forward_metadata_out_graph`), so decode batches with
compressed rows replay graphs. What runs eagerly — the CUDA-graph runners'
``can_run_graph`` is hooked to say no (:func:`graph_allowed`), counted in ``/server_info``,
per batch — is: every batch with compressed rows under the torch kernel, extend batches with
compressed or capturing rows, and decode batches where a row captures decode queries or
moves its tail into pages that step (host work inside the forward).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.ragged import GraphRows, RaggedAttention, RaggedRows, TorchRaggedAttention, rows_for_queries
from headkv_sglang.serving.parallel import tp_ops, tp_shard
from headkv_sglang.serving.pool_sizing import compressed_pool_pages
from headkv_sglang.serving.requests import question_finder
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")

# The SGLang backends the headkv backend can wrap, per device.
SUPPORTED_BACKENDS = ("flashinfer", "torch_native")


@dataclass
class _Batch:
    """What one forward batch needs beyond the inner backend's metadata."""

    fb: Any  # the ForwardBatch it was planned for
    inner_fb: Any  # what the inner backend sees (compressed decode rows shortened to 1 token)
    q_index: torch.Tensor  # int64 [R] on the device: token rows of q attended by the kernel
    # decode-phase compression: (kernel row, req_pool_idx) whose queries are kept, and the
    # (req_pool_idx, start, end) whose tail positions [start, end) move into pages after the last layer
    capture: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    decode_jobs: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


def stand_in_batch(fb, positions: list[int]):
    """A shallow copy of ``fb`` whose compressed rows (``positions``) are 1 token long.

    The inner backend then plans and attends one key for each of them instead of the whole
    prompt (whose slots are released); their output is overwritten by the ragged kernel.
    """
    inner = copy.copy(fb)
    seq_lens = fb.seq_lens.clone()
    seq_lens[torch.tensor(positions, dtype=torch.int64, device=seq_lens.device)] = 1
    inner.seq_lens = seq_lens
    if getattr(fb, "seq_lens_cpu", None) is not None:
        cpu = fb.seq_lens_cpu.clone()
        cpu[torch.tensor(positions, dtype=torch.int64)] = 1
        inner.seq_lens_cpu = cpu
        inner.seq_lens_sum = int(cpu.sum())
    else:
        inner.seq_lens_sum = int(seq_lens.sum())
    return inner


class HeadKVAttnBackend:
    """SGLang attention backend = ``inner`` + compressed rows through ``kernel``.

    Attributes not defined here (CUDA-graph state, ``forward_metadata``, …) are the inner
    backend's, so SGLang's runners drive it as they would drive ``inner``.
    """

    def __init__(self, inner, manager: CompressionManager, kernel: RaggedAttention, req_to_token_pool,
                 token_to_kv_pool) -> None:
        self.inner = inner
        self.manager = manager
        self.kernel = kernel
        self.req_to_token_pool = req_to_token_pool  # SGLang's ReqToTokenPool: req_to_token [rows, context] int32
        self.token_to_kv_pool = token_to_kv_pool  # SGLang's KV pool: get_key_buffer(layer) [slots, Hkv, D]
        self._batch: _Batch | None = None
        self._seen_fb: Any = None
        # CUDA graphs of decode batches with compressed rows (init_cuda_graph_state): a graphed
        # kernel, where its rows sit in the padded batch, and the batches captured with them
        self.graph_kernel: RaggedAttention | None = None
        self.graph_rows: GraphRows | None = None
        self._graph_fbs: dict[int, Any] = {}
        self.graph_compressed_batches = 0  # decode batches with compressed rows a graph ran

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # SGLang's runners also *assign* the metadata (graph glue snapshot/restore, idle batches):
    # it must land on the inner backend, which reads it.
    @property
    def forward_metadata(self):
        return self.inner.forward_metadata

    @forward_metadata.setter
    def forward_metadata(self, value) -> None:
        self.inner.forward_metadata = value

    # ------------------------------------------------------------------ planning
    def _compressed_positions(self, fb) -> list[int]:
        recs = self.manager.records
        if not recs or fb.req_pool_indices is None:
            return []
        return [i for i, idx in enumerate(fb.req_pool_indices.tolist()) if idx in recs]

    def init_forward_metadata(self, fb) -> None:
        self._seen_fb = fb
        self._batch = None
        positions = self._compressed_positions(fb)
        if not positions:
            self.inner.init_forward_metadata(fb)
            return
        inner_fb = stand_in_batch(fb, positions) if fb.forward_mode.is_decode() else fb
        self.inner.init_forward_metadata(inner_fb)
        self._batch = self._plan(fb, inner_fb, positions)

    def _plan(self, fb, inner_fb, positions: list[int]) -> _Batch:
        mode = fb.forward_mode
        idxs = fb.req_pool_indices.tolist()
        records = [self.manager.records[idxs[i]] for i in positions]
        req_to_token = self.req_to_token_pool.req_to_token
        device = fb.req_pool_indices.device
        if mode.is_decode():
            seq_lens = fb.seq_lens_cpu.tolist() if getattr(fb, "seq_lens_cpu", None) is not None \
                else fb.seq_lens.tolist()
            rows = rows_for_queries(records, req_to_token, [idxs[i] for i in positions],
                                    [r.tail_start for r in records], [seq_lens[i] for i in positions])
            q_index = positions
            capture, jobs = [], []
            for r, (i, rec) in enumerate(zip(positions, records)):
                if rec.moves_decode:
                    if not rec.decode_recency:
                        capture.append((r, idxs[i]))
                    due = self.manager.decode_due(idxs[i], seq_lens[i])
                    if due is not None:
                        jobs.append((idxs[i], *due))
            self.kernel.plan(rows)
            return _Batch(fb, inner_fb, torch.tensor(q_index, dtype=torch.int64, device=device), capture, jobs)
        elif mode.is_extend() and not mode.is_target_verify():
            # every query token of a compressed row (a decode request merged into a prefill
            # batch: --enable-mixed-chunk) sees the tail up to its own position
            prefix = [int(x) for x in fb.extend_prefix_lens_cpu]
            ext = [int(x) for x in fb.extend_seq_lens_cpu]
            starts = [0]
            for n in ext:
                starts.append(starts[-1] + n)
            recs, rows_idx, tail_start, tail_end, q_index = [], [], [], [], []
            for rec, i in zip(records, positions):
                for j in range(ext[i]):
                    recs.append(rec)
                    rows_idx.append(idxs[i])
                    tail_start.append(rec.tail_start)
                    tail_end.append(prefix[i] + j + 1)
                    q_index.append(starts[i] + j)
            rows = rows_for_queries(recs, req_to_token, rows_idx, tail_start, tail_end)
        else:
            raise NotImplementedError(f"headkv_sglang: compressed requests in a {mode.name} batch "
                                      "(speculative decoding is not supported with --kv-policy)")
        self.kernel.plan(rows)
        return _Batch(fb, inner_fb, torch.tensor(q_index, dtype=torch.int64, device=device))

    # ------------------------------------------------------------------ CUDA graphs
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs) -> None:
        """The inner backend's graph state, and (FlashInfer kernel) a graphed ragged kernel whose
        fixed buffers hold ``max_bs`` compressed rows, every page of the compressed pool in one
        layer and every slot of SGLang's token pool as tails: any decode batch a graph runs fits."""
        self.inner.init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self.graph_kernel = make_graph_kernel(self.kernel, max_bs, self.token_to_kv_pool.get_key_buffer(0).shape[0])
        if self.graph_kernel is not None:
            self.graph_rows = GraphRows(max_bs, max_bs, self.manager.pool.device)

    def graph_fits(self, fb) -> bool:
        """Whether a CUDA graph can run decode batch ``fb``'s compressed rows: a graphed kernel
        exists and no row captures decode queries or moves its tail into pages this step (host
        work inside the forward)."""
        if self.graph_kernel is None or not fb.forward_mode.is_decode():
            return False
        idxs = fb.req_pool_indices.tolist()
        if any(self.manager.capturing(i) for i in idxs):  # only this batch's rows run in this forward
            return False
        seq_lens = fb.seq_lens_cpu.tolist() if getattr(fb, "seq_lens_cpu", None) is not None else fb.seq_lens.tolist()
        for idx, seq_len in zip(idxs, seq_lens):
            rec = self.manager.records.get(idx)
            if rec is not None and rec.moves_decode and (
                    not rec.decode_recency or self.manager.decode_due(idx, seq_len) is not None):
                return False
        return len(idxs) <= self.graph_rows.max_bs

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False) -> None:
        """SGLang's per-replay (and capture) metadata: the inner backend's, over the stand-in
        batch (compressed rows 1 token long), plus the graphed kernel's plan and the rows it
        fills. At capture every row is padding; a replay's padding rows (``fb.num_padding``, at
        the end) are never compressed rows, whatever their request index."""
        if self.graph_kernel is None or not fb.forward_mode.is_decode():
            self.inner.init_forward_metadata_out_graph(fb, in_capture=in_capture)
            return
        bs = fb.batch_size
        if in_capture:
            self.inner.init_forward_metadata_out_graph(fb, in_capture=True)
            self._graph_fbs[id(fb)] = fb  # its forward is the graphed one
            self.graph_kernel.plan(RaggedRows([], torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)))
            self.graph_rows.fill([], bs)
            return
        real = bs - int(getattr(fb, "num_padding", 0) or 0)
        recs = self.manager.records
        idxs = fb.req_pool_indices[:real].tolist()
        positions = [i for i, idx in enumerate(idxs) if idx in recs]
        if not positions:
            self.inner.init_forward_metadata_out_graph(fb)
            self.graph_rows.fill([], bs)
            return
        view = copy.copy(fb)
        for name in ("seq_lens", "seq_lens_cpu"):
            if getattr(fb, name, None) is not None:
                lens = getattr(fb, name).clone()
                lens[torch.tensor(positions, dtype=torch.int64, device=lens.device)] = 1
                setattr(view, name, lens)
        if getattr(fb, "seq_lens_sum", None) is not None:
            view.seq_lens_sum = int(view.seq_lens_cpu.sum()) if view.seq_lens_cpu is not None \
                else int(view.seq_lens.sum())
        self.inner.init_forward_metadata_out_graph(view)
        seq_lens = (fb.seq_lens_cpu if getattr(fb, "seq_lens_cpu", None) is not None else fb.seq_lens).tolist()
        records = [recs[idxs[i]] for i in positions]
        rows = rows_for_queries(records, self.req_to_token_pool.req_to_token, [idxs[i] for i in positions],
                                [r.tail_start for r in records], [seq_lens[i] for i in positions])
        self.graph_kernel.plan(rows)
        self.graph_rows.fill(positions, bs)

    def _forward_graphed(self, q, k, v, layer, fb, save_kv_cache: bool, **kwargs):
        """A captured decode forward: the inner backend's attention, then the graphed kernel over
        its fixed rows written over the compressed ones. Only fixed-shape device work: the
        graph replays it after :meth:`init_forward_metadata_out_graph` refilled the buffers."""
        o = self.inner.forward_decode(q, k, v, layer, fb, save_kv_cache=save_kv_cache, **kwargs)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        pool = self.token_to_kv_pool
        out = self.graph_kernel.run(layer.layer_id, self.graph_rows.queries(q_), pool.get_key_buffer(layer.layer_id),
                                    pool.get_value_buffer(layer.layer_id), layer.scaling)
        self.graph_rows.merge(o.view(-1, layer.tp_q_head_num, layer.v_head_dim), out)
        return o

    def _batch_for(self, fb) -> _Batch | None:
        if self._seen_fb is fb:
            return self._batch
        # A path that initialised the inner backend without us: a CUDA graph being captured
        # (decode graphs take _forward_graphed; other graphs never run compressed rows,
        # graph_allowed) has nothing to plan; otherwise plan now, the inner backend having
        # seen all rows.
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        self._seen_fb = fb
        positions = self._compressed_positions(fb)
        self._batch = self._plan(fb, fb, positions) if positions else None
        return self._batch

    # ------------------------------------------------------------------ forward
    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            return self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if self._graph_fbs.get(id(forward_batch)) is forward_batch:
            return self._forward_graphed(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        b = self._batch_for(forward_batch)
        if b is None:
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        o = self.inner.forward_decode(q, k, v, layer, b.inner_fb, save_kv_cache=save_kv_cache, **kwargs)
        o = self._attend_compressed(o, q, layer, forward_batch, b)
        if b.decode_jobs and layer.layer_id == self.manager.shape.num_layers - 1:
            self._compress_decode(b, layer.scaling)
        return o

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        b = self._batch_for(forward_batch)
        o = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if b is not None:
            o = self._attend_compressed(o, q, layer, forward_batch, b)
        if self.manager.prefill_work():
            self._capture_window(q, layer, forward_batch)
            self._compress_completed(layer, forward_batch)
        return o

    def _attend_compressed(self, o, q, layer, fb, b: _Batch):
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim).index_select(0, b.q_index)
        pool = self.token_to_kv_pool
        out = self.kernel.run(layer.layer_id, q_, pool.get_key_buffer(layer.layer_id),
                              pool.get_value_buffer(layer.layer_id), layer.scaling)
        o.view(-1, layer.tp_q_head_num, layer.v_head_dim).index_copy_(0, b.q_index, out.to(o.dtype))
        for r, idx in b.capture:
            self.manager.capture_decode_query(layer.layer_id, idx, q_[r])
        return o

    def _compress_decode(self, b: _Batch, scale: float) -> None:
        """After the last layer of a decode forward: move the due tails into pages
        (:meth:`~headkv_sglang.kv.manager.CompressionManager.compress_decode`); the next batch
        plans with the new records, and ``serving.lifecycle`` frees the moved slots."""
        pool = self.token_to_kv_pool
        for idx, start, end in b.decode_jobs:
            slots = self.req_to_token_pool.req_to_token[idx, start:end].to(torch.int64)

            def get_kv(layer: int, slots=slots):
                return pool.get_key_buffer(layer)[slots], pool.get_value_buffer(layer)[slots]

            try:
                self.manager.compress_decode(idx, start, end, get_kv, scale)
            except Exception as e:  # never take the server down: this request's tail stays whole
                self.manager.decode_failed(idx, e)

    def _rows(self, fb) -> list[int]:
        """``fb.req_pool_indices`` on the host, read once per forward batch (one sync, not one per layer)."""
        cached = self.__dict__.get("_rows_of")
        if cached is None or cached[0] is not fb:
            cached = self._rows_of = (fb, fb.req_pool_indices.tolist())
        return cached[1]

    def _capture_window(self, q, layer, fb) -> None:
        """Keep each capturing row's scoring queries of this chunk (question or window)."""
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        start, lid = 0, layer.layer_id
        for idx, n, pos in zip(self._rows(fb), fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu):
            n = int(n)
            if self.manager.capturing(idx):

                def get_k(end: int, idx=idx):  # question-agnostic scoring: this layer's keys [0, end)
                    slots = self.req_to_token_pool.req_to_token[idx, :end].to(torch.int64)
                    return self.token_to_kv_pool.get_key_buffer(lid)[slots]

                self.manager.capture_queries(lid, idx, q_[start:start + n], pos=int(pos), get_k=get_k)
            start += n

    def _compress_completed(self, layer, fb) -> None:
        """Compress this layer of every row whose chunk completes the prompt it is to be compressed
        at, right after the layer's attention (its K/V and scoring queries are at hand); the last
        layer writes the pages (a ``kv_share`` row pinned to a shared prompt reads it from then
        on, :meth:`CompressionManager.adopt_in_forward`). Nothing then runs between this prefill and the next forward but
        releasing the prompt's token slots (``serving.lifecycle``), so the overlap scheduler can
        launch the next batch, which already treats these rows as compressed."""
        lid = layer.layer_id
        for idx, n, pos in zip(self._rows(fb), fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu):
            end = int(pos) + int(n)

            def get_kv(layer: int, idx=idx, end=end):  # any layer's: a global selection reads them all
                slots = self.req_to_token_pool.req_to_token[idx, :end].to(torch.int64)
                pool = self.token_to_kv_pool
                return pool.get_key_buffer(layer)[slots], pool.get_value_buffer(layer)[slots]

            self.manager.on_prefill_layer(lid, idx, end, get_kv)


def make_graph_kernel(kernel: RaggedAttention, max_rows: int, max_tail: int) -> RaggedAttention | None:
    """A CUDA-graph version of ``kernel`` (FlashInfer only; None for the torch kernel: its
    batches run eagerly) holding ``max_rows`` rows, every page of its pool in one layer and
    ``max_tail`` tail slots; it shares ``kernel``'s float workspace (they never run at once).

    None too with ``--kv-memory shared``: its pages are planned token by token, and buffers for
    every page of the one memory in each layer would take an int32 per head-vector of the whole
    KV memory, per layer."""
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    if not isinstance(kernel, FlashInferRaggedAttention) or kernel.shared:
        return None
    return FlashInferRaggedAttention(kernel.pool, kernel.num_layers, kernel.num_kv_heads, kernel.num_q_heads,
                                     kernel.scale, cuda_graph=True, max_rows=max_rows,
                                     max_pages=kernel.pool.num_pages, max_tail=max_tail, workspace=kernel.workspace)


# ---------------------------------------------------------------------------- construction
def make_kernel(pool, shape, device: torch.device, scale: float) -> tuple[str, RaggedAttention]:
    """The RaggedAttention kernel for ``device``: FlashInfer on CUDA, batched torch elsewhere.

    ``HEADKV_SGLANG_RAGGED_KERNEL=torch`` forces the torch kernel (for comparisons).
    """
    import os

    choice = os.environ.get("HEADKV_SGLANG_RAGGED_KERNEL", "auto")
    if choice not in ("auto", "torch", "flashinfer"):
        raise SystemExit(f"HEADKV_SGLANG_RAGGED_KERNEL={choice!r}: choose auto, torch or flashinfer")
    if choice == "flashinfer" or (choice == "auto" and device.type == "cuda"):
        from flashinfer_ext.ragged import FlashInferRaggedAttention

        return "flashinfer", FlashInferRaggedAttention(pool, shape.num_layers, shape.num_kv_heads,
                                                       shape.num_q_heads, scale)
    return "torch", TorchRaggedAttention(pool, shape.num_layers, shape.num_kv_heads)


def backend_factory(state: ServingState, name: str, original: Callable) -> Callable:
    """The attention-registry factory for ``name``: SGLang's backend, wrapped."""

    def create(runner):
        inner = original(runner)
        kv_pool = runner.token_to_kv_pool
        dtype = kv_pool.get_key_buffer(0).dtype
        device = torch.device(runner.device)
        shard = tp_shard()
        gather = gather_queries = None
        if shard.tp_size > 1:
            gather, state.min_over_ranks, state.gather_objects, gather_queries = tp_ops(shard, state.shape.num_kv_heads)
        state.tp_rank, state.tp_size = shard.tp_rank, shard.tp_size
        lo, hi = shard.kv_heads(state.shape.num_kv_heads)
        pool = allocator = None
        if state.cfg.memory == "shared":  # one memory: the pages live in SGLang's token slots
            from headkv_sglang.serving.one_memory import build

            # --tp: the ranks borrow and give back slots together (their schedulers decide alike)
            pool, allocator = build(state, kv_pool, runner.token_to_kv_pool_allocator, hi - lo,
                                    agree_min=state.min_over_ranks)
            num_pages = allocator.num_pages
        else:
            num_pages = compressed_pool_pages(state, hi - lo)
            if state.min_over_ranks is not None:  # every rank's pool the same size: admission agrees
                num_pages = state.min_over_ranks(num_pages)
        manager = CompressionManager(state.shape, num_pages, state.cfg.page_size, dtype, device,
                                     shard=shard, gather=gather, min_over_ranks=state.min_over_ranks,
                                     gather_queries=gather_queries, pool=pool, allocator=allocator)
        kernel_name, kernel = make_kernel(manager.pool, manager.shape, device, state.shape.head_dim ** -0.5)
        state.manager, state.inner_backend, state.kernel = manager, name, kernel_name
        state.questions = question_finder(runner.server_args)
        logger.info(
            "headkv_sglang: %s attention wrapped (compressed rows: %s kernel); compressed pool %d pages x %d "
            "tokens (%.1f MB), policy %s, budget %s", name, kernel_name, num_pages, state.cfg.page_size,
            num_pages * manager.pool.bytes_per_page / 2**20, state.cfg.policy, state.cfg.budget_label,
        )
        return HeadKVAttnBackend(inner, manager, kernel, runner.req_to_token_pool, kv_pool)

    return create


def graph_allowed(state: ServingState, result, runner, forward_batch, *args, **kwargs):
    """AFTER a graph runner's ``can_run_graph``: no graph for compressed or capturing rows.

    A captured graph replays the inner backend alone; a batch that needs the ragged
    kernel or window capture runs eagerly instead (this batch only).
    """
    m = state.manager
    if not result or m is None or not m.states() or forward_batch.req_pool_indices is None:
        return result
    if not m.has_rows(forward_batch.req_pool_indices.tolist()):
        return result
    backend = getattr(runner, "attn_backend", None)
    if isinstance(backend, HeadKVAttnBackend) and backend.graph_fits(forward_batch):
        backend.graph_compressed_batches += 1
        return True
    if state.graph_fallback_batches == 0:
        logger.info("headkv_sglang: batches with compressed or capturing rows run eagerly, not as CUDA graphs "
                    "(counted in /server_info attention_backend.graph_fallback_batches)")
    state.graph_fallback_batches += 1
    return False
