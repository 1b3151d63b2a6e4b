"""FlashInfer decode over the ragged per-head pool (GPU), and the dense baseline.

:class:`RaggedDecode` runs one decode step of one layer: each (request, KV head) is
one row of a FlashInfer paged batch with ``num_kv_heads=1`` whose query is that
head's group of ``G = Hq / Hkv`` query heads (:mod:`flashinfer_ext.plan` builds the
CSR tables). :class:`DenseDecode` is FlashInfer's ordinary GQA decode over an
uncompressed cache: the decode tail of a compressed request, and the full-KV
baseline of ``benchmarks/kernels.py``. :func:`merge` combines the two states
(attention over the union of the compressed prompt and the tail).

Both wrappers follow SGLang's FlashInfer backend: ``plan`` (host work, tables copied to
the device), then ``run`` per layer. The compressed rows do not grow while a request
decodes, so a RaggedDecode plan (one wrapper per layer) holds until the batch changes;
the tail's DenseDecode plans every step, as SGLang's does. With ``cuda_graph=True`` the
tables, output and log-sum-exp live in fixed buffers so ``run`` can be captured in a CUDA
graph and replayed after a new ``plan`` with the same number of rows.

Log-sum-exp values returned here are natural logarithms, like
:mod:`headkv_sglang.reference` (FlashInfer's are base 2). FlashInfer is imported on
first use: this module imports on a machine without it.
"""

from __future__ import annotations

import math

import torch

from flashinfer_ext.plan import DecodePlan, fill_empty_rows, merge_chunks, split_rows
from headkv_sglang.reference import merge_states

LN2 = math.log(2.0)


def _flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"flashinfer_ext needs the flashinfer-python package ({e})") from e
    return flashinfer


class _PagedDecode:
    """A FlashInfer ``BatchDecodeWithPagedKVCacheWrapper`` with optional fixed (graph-safe) buffers."""

    def __init__(self, device: str | torch.device = "cuda", *, workspace_bytes: int = 256 << 20,
                 cuda_graph: bool = False, max_rows: int = 0, max_pages: int = 0, backend: str = "fa2",
                 use_tensor_cores: bool = False, workspace: torch.Tensor | None = None):
        """``workspace``: a uint8 float-workspace buffer to share with other wrappers whose runs
        never overlap (each wrapper still keeps its own plan); default: a new one of
        ``workspace_bytes``."""
        if cuda_graph and (max_rows <= 0 or max_pages <= 0):
            raise ValueError(f"cuda_graph needs max_rows > 0 and max_pages > 0, got {max_rows}, {max_pages}")
        fi = _flashinfer()
        self.device = torch.device(device)
        self.cuda_graph = cuda_graph
        self.workspace = workspace if workspace is not None else torch.empty(
            workspace_bytes, dtype=torch.uint8, device=self.device)
        kw = {}
        if cuda_graph:
            self.max_rows, self.max_pages = max_rows, max_pages
            kw = dict(paged_kv_indptr_buffer=torch.zeros(max_rows + 1, dtype=torch.int32, device=self.device),
                      paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=self.device),
                      paged_kv_last_page_len_buffer=torch.zeros(max_rows, dtype=torch.int32, device=self.device))
        self.wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_cuda_graph=cuda_graph,
                                                             use_tensor_cores=use_tensor_cores, backend=backend, **kw)
        self._out: torch.Tensor | None = None  # views of the first rows of the buffers below
        self._lse: torch.Tensor | None = None
        self._out_buf: torch.Tensor | None = None
        self._lse_buf: torch.Tensor | None = None

    def _plan(self, indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, dtype, scale,
              **options):
        rows = last.numel()
        if self.cuda_graph and (rows != self.max_rows or indices.numel() > self.max_pages):
            raise ValueError(f"a graphed wrapper plans exactly {self.max_rows} rows and at most {self.max_pages} "
                             f"pages, got {rows} rows and {indices.numel()} pages")
        # FlashInfer plans the split-KV schedule from host indptr / last_page_len and copies the
        # tables to the device; the page ids may already be there (no round trip through the host)
        self.wrapper.plan(indptr.to("cpu", torch.int32), indices.to(torch.int32),
                          last.to("cpu", torch.int32), num_qo_heads, num_kv_heads, head_dim, page_size,
                          pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype, sm_scale=scale,
                          **options)
        out = self._out
        if out is not None and out.shape == (rows, num_qo_heads, head_dim) and out.dtype == dtype:
            return
        buf = self._out_buf
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != (num_qo_heads, head_dim) or buf.dtype != dtype:
            # grown, never shrunk: a batch change of a row or two allocates nothing
            self._out_buf = torch.empty(rows, num_qo_heads, head_dim, dtype=dtype, device=self.device)
            self._lse_buf = torch.empty(rows, num_qo_heads, dtype=torch.float32, device=self.device)
        self._out, self._lse = self._out_buf[:rows], self._lse_buf[:rows]

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._out is not None and self._lse is not None, "plan() before run()"
        self.wrapper.run(q, (k, v), out=self._out, lse=self._lse, return_lse=True)
        return self._out, self._lse


class RaggedDecode(_PagedDecode):
    """Decode attention over the compressed pool: one ``num_kv_heads=1`` row per (request, KV head).

    ``plan(plan, group, head_dim, dtype, scale)`` then ``run(q, k_pages, v_pages)`` with
    ``q`` ``[R, Hkv, G, D]`` and the pool's ``k_pages``/``v_pages`` ``[num_pages, page_size, D]``.
    Rows with no tokens (FlashInfer has no empty row) read one dummy token of page 0 and
    come back as ``o = 0``, ``lse = -inf``, the reference's empty state. ``run`` returns views
    of the wrapper's output buffers: the next ``run`` overwrites them.

    ``chunk_pages > 0`` cuts every row into chunks of at most that many pages, one kernel row
    each, merged after the kernel (:func:`flashinfer_ext.plan.merge_chunks`): with HeadKV's
    skewed budgets a few rows hold most of the tokens and would otherwise each run on one
    thread block. With ``cuda_graph`` the chunk count is padded to ``max_chunks`` and
    ``max_rows`` is the number of (request, KV head) rows.
    """

    def __init__(self, device: str | torch.device = "cuda", *, chunk_pages: int = 0, max_chunks: int = 0,
                 cuda_graph: bool = False, max_rows: int = 0, max_pages: int = 0, **kw):
        if chunk_pages < 0:
            raise ValueError(f"chunk_pages must be >= 0, got {chunk_pages}")
        self.chunk_pages = chunk_pages
        self._graph_rows = max_rows
        if chunk_pages and cuda_graph:
            if max_chunks <= 0 or max_rows <= 0:
                raise ValueError(f"a graphed chunked wrapper needs max_rows > 0 and max_chunks > 0, "
                                 f"got {max_rows}, {max_chunks}")
            # the kernel's rows are the chunks; each padding chunk reads one page
            max_rows, max_pages = max_chunks, max_pages + max_chunks
        super().__init__(device, cuda_graph=cuda_graph, max_rows=max_rows, max_pages=max_pages, **kw)
        if cuda_graph and not chunk_pages:  # a captured run always masks: later plans may have empty rows
            self._empty = torch.zeros(self.max_rows, dtype=torch.bool, device=self.device)

    def plan(self, plan: DecodePlan, group: int, head_dim: int, dtype: torch.dtype, scale: float,
             **options) -> None:
        """``options``: FlashInfer plan options (``disable_split_kv``, ``fixed_split_size`` with tensor cores)."""
        if self.chunk_pages:
            self._rows, self._kv_heads = plan.num_rows, plan.num_kv_heads
            self._plan_chunks(plan, group, head_dim, dtype, scale, **options)
            return
        # one dummy page for each empty row, masked out after the kernel
        indptr, indices, last, empty = fill_empty_rows(plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)
        self.plan_rows(indptr, indices, last, empty.to(self.device), bool(empty.any()), plan.num_kv_heads, group,
                       head_dim, plan.page_size, dtype, scale, **options)

    def plan_rows(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
                  empty: torch.Tensor, any_empty: bool, num_kv_heads: int, group: int, head_dim: int,
                  page_size: int, dtype: torch.dtype, scale: float, **options) -> None:
        """Plan rows whose empty ones already hold one dummy token (``headkv_sglang.kv.plan_tables``).

        ``kv_indptr`` int32 ``[rows + 1]`` and ``kv_last_page_len`` int32 ``[rows]`` on the host,
        ``kv_indices`` int32 on the host or the device, ``empty`` bool ``[rows]`` on the device
        (rows whose output is masked to the empty state), ``any_empty`` whether any is set;
        rows are ``r * num_kv_heads + h``.
        """
        if self.chunk_pages:
            raise ValueError("plan_rows does not chunk rows: use plan() with a DecodePlan")
        self._rows, self._kv_heads = kv_last_page_len.numel(), num_kv_heads
        self._plan(kv_indptr, kv_indices, kv_last_page_len, group, 1, head_dim, page_size, dtype, scale, **options)
        if self.cuda_graph:
            self._empty.copy_(empty)
            self._mask = True
        else:
            self._empty = empty
            self._mask = any_empty

    def _plan_chunks(self, plan: DecodePlan, group, head_dim, dtype, scale, **options) -> None:
        if self.cuda_graph:
            if plan.num_rows != self._graph_rows:
                raise ValueError(f"a graphed wrapper plans exactly {self._graph_rows} rows, got {plan.num_rows}")
            cp = split_rows(plan, self.chunk_pages, pad_to=self.max_rows)
        else:
            cp = split_rows(plan, self.chunk_pages)
            if cp.num_chunks == 0:  # every row empty: one padding chunk keeps the kernel's batch non-empty
                cp = split_rows(plan, self.chunk_pages, pad_to=1)
        self._plan(cp.kv_indptr, cp.kv_indices, cp.kv_last_page_len, group, 1, head_dim, plan.page_size, dtype,
                   scale, **options)
        if self.cuda_graph:
            if not hasattr(self, "_chunk_row"):
                self._chunk_row = torch.zeros(self.max_rows, dtype=torch.int64, device=self.device)
                self._q_index = torch.zeros(self.max_rows, dtype=torch.int64, device=self.device)
            self._chunk_row.copy_(cp.chunk_row)
            self._q_index.copy_(cp.q_index)
        else:
            self._chunk_row = cp.chunk_row.to(self.device)
            self._q_index = cp.q_index.to(self.device)

    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R, H, G, D = q.shape
        if R * H != self._rows or H != self._kv_heads:
            raise ValueError(f"q {list(q.shape)} does not match the plan ({self._rows} rows of {self._kv_heads} KV heads)")
        q_rows = q.reshape(R * H, G, D)
        if self.chunk_pages:
            o_c, lse2 = self._run(q_rows.index_select(0, self._q_index), k_pages.unsqueeze(2), v_pages.unsqueeze(2))
            o, lse = merge_chunks(o_c, lse2.mul_(LN2), self._chunk_row, R * H)
            return o.to(q.dtype).view(R, H, G, D), lse.view(R, H, G)
        o, lse2 = self._run(q_rows, k_pages.unsqueeze(2), v_pages.unsqueeze(2))
        lse = lse2.mul_(LN2)  # in place, in the wrapper's buffers: no allocation in a captured graph
        if self._mask:
            e = self._empty[:, None]
            lse.masked_fill_(e, -math.inf)
            o.masked_fill_(e[..., None], 0)
        return o.view(R, H, G, D), lse.view(R, H, G)


class DenseDecode(_PagedDecode):
    """FlashInfer GQA decode over an uncompressed paged cache ``[num_pages, page_size, Hkv, D]``.

    ``plan(kv_indptr, kv_indices, kv_last_page_len, num_q_heads, num_kv_heads, head_dim,
    page_size, dtype, scale)`` (one row per request, every row non-empty), then
    ``run(q [R, Hq, D], k_cache, v_cache)`` → ``o [R, Hq, D]``, natural ``lse [R, Hq]``.
    """

    def plan(self, kv_indptr, kv_indices, kv_last_page_len, num_q_heads: int, num_kv_heads: int,
             head_dim: int, page_size: int, dtype: torch.dtype, scale: float, **options) -> None:
        if bool((kv_indptr[1:] == kv_indptr[:-1]).any()):
            raise ValueError("DenseDecode rows must be non-empty")
        self._plan(kv_indptr, kv_indices, kv_last_page_len, num_q_heads, num_kv_heads, head_dim, page_size,
                   dtype, scale, **options)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse2 = self._run(q, k_cache, v_cache)
        return o, lse2.mul_(LN2)


def merge(o_prompt: torch.Tensor, lse_prompt: torch.Tensor, o_tail: torch.Tensor, lse_tail: torch.Tensor,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of the compressed prompt and the decode tail.

    ``o_prompt`` ``[R, Hkv, G, D]`` / ``lse_prompt`` ``[R, Hkv, G]`` from :class:`RaggedDecode`;
    ``o_tail`` ``[R, Hq, D]`` / ``lse_tail`` ``[R, Hq]`` from :class:`DenseDecode` (query head
    ``h*G + g`` of KV head ``h``). Returns float32 ``o [R, Hq, D]``, ``lse [R, Hq]``.
    """
    R, H, G, D = o_prompt.shape
    return merge_states(o_prompt.reshape(R, H * G, D), lse_prompt.reshape(R, H * G), o_tail, lse_tail)
