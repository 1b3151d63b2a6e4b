"""FlashInferRaggedAttention: the GPU kernel behind ``headkv_sglang.kv.ragged.RaggedAttention``.

Per layer, for the planned compressed rows:

* prompt pages: :class:`~flashinfer_ext.decode.RaggedDecode`, one ``num_kv_heads=1`` row per
  (row, KV head); one wrapper per layer, all created at start-up, planned only when the
  batch's records change (pages do not change while a request decodes). The tables come
  from :mod:`headkv_sglang.kv.plan_tables`: each request's rows of every layer are built
  once and a batch's tables assembled from them with a fixed number of torch operations
  (page ids stay on the device), so a batch change costs, per layer, only FlashInfer's
  own plan;
* tail: :class:`~flashinfer_ext.decode.DenseDecode` over SGLang's token pool viewed as
  1-token pages (``[slots, 1, Hkv, D]``), indices = the tail slots; planned once per
  batch (shared by every layer);
* Razor's compensation: one extra logit ``q·k_c·scale + log(n_dropped)`` per (row, head),
  in torch;

merged by log-sum-exp. Pages inside SGLang's token slots (``--kv-memory shared``,
:class:`~headkv_sglang.kv.shared_memory.SharedPagePool`) are not blocks of memory: their
tables are re-expressed as 1-token pages at the head-vectors' rows of the flat buffers
(:func:`~headkv_sglang.kv.plan_tables.token_tables`, one ``physical`` mapping for every layer
per plan) and FlashInfer reads
``k_flat``/``v_flat`` as ``[rows, 1, 1, D]``. The float workspace is shared by all wrappers (layers run one
after another on one stream); each wrapper keeps its own plan.

With ``cuda_graph=True`` every table, output and compensation state lives in a fixed
buffer sized by ``max_rows`` (compressed rows), ``max_pages`` (prompt pages of one layer,
all rows) and ``max_tail`` (tail slots, all rows): :meth:`run` can be captured in a CUDA
graph once and replayed after any later :meth:`plan` of at most ``max_rows`` rows. The
plan pads the batch with empty rows (one dummy page / tail slot each, masked or
dropped); ``run`` then takes ``q`` of ``max_rows`` rows and returns ``max_rows`` rows, of
which the first ``rows.num_rows`` are the planned ones (SGLang's graphs pad a batch the
same way).

Imports FlashInfer on first use; nothing here imports SGLang.
"""

from __future__ import annotations

import math

import torch

from flashinfer_ext.decode import DenseDecode, RaggedDecode
from headkv_sglang.kv.plan_tables import TableCache, token_tables
from headkv_sglang.kv.pool import RaggedHeadKVPool
from headkv_sglang.kv.ragged import RaggedAttention, RaggedRows
from headkv_sglang.reference import merge_states


class FlashInferRaggedAttention(RaggedAttention):
    """RaggedAttention on CUDA through FlashInfer (see the module docstring).

    ``scale`` is fixed at plan time (FlashInfer plans ``sm_scale``): ``run`` checks that
    the layer's scale matches.
    """

    def __init__(self, pool: RaggedHeadKVPool, num_layers: int, num_kv_heads: int, num_q_heads: int,
                 scale: float, *, workspace_bytes: int = 256 << 20, cuda_graph: bool = False,
                 max_rows: int = 0, max_pages: int = 0, max_tail: int = 0,
                 workspace: torch.Tensor | None = None) -> None:
        super().__init__(pool, num_layers, num_kv_heads)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if cuda_graph and min(max_rows, max_pages, max_tail) <= 0:
            raise ValueError(f"cuda_graph needs max_rows, max_pages and max_tail > 0, got {max_rows}, "
                             f"{max_pages}, {max_tail}")
        self.num_q_heads, self.scale = num_q_heads, scale
        self.group = num_q_heads // num_kv_heads
        self.cuda_graph = cuda_graph
        self.max_rows, self.max_pages, self.max_tail = max_rows, max_pages, max_tail
        device = pool.device
        # pages inside SGLang's token slots (--kv-memory shared, not one block of memory each):
        # planned as 1-token pages at their physical rows of the flat buffers
        self.shared = not pool.contiguous
        self.index_unit = pool.page_size if self.shared else 1  # kernel indices per page
        # ``workspace``: share another kernel's float workspace (runs that never overlap)
        self.workspace = workspace if workspace is not None else torch.empty(workspace_bytes, dtype=torch.uint8,
                                                                             device=device)
        # every layer's wrapper (and, graphed, its fixed buffers) at start-up, not in the first plan
        self._ragged: list[RaggedDecode] = [self._new_ragged() for _ in range(num_layers)]
        # graphed: every row (padding too) has >= 1 tail slot and may have a dummy page
        graph_kw = dict(cuda_graph=True, max_rows=max_rows, max_pages=max_tail + max_rows) if cuda_graph else {}
        self._tail = DenseDecode(device, workspace=self.workspace, **graph_kw)
        self._prompt_key: tuple[int, ...] | None = None
        # each request's rows of every layer, built once (empty rows with their dummy page)
        self.tables = TableCache(pool.page_size, pool.head_dim, pool.dtype, device, dummy_empty=True)
        # Razor's compensation of the planned rows, all layers: k, v [L, rows, H, D], bias [L, rows, H]
        self._comp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if cuda_graph:  # in fixed buffers, always applied (-inf bias: weight 0)
            H, D = num_kv_heads, pool.head_dim
            self._comp = (torch.zeros(num_layers, max_rows, H, D, dtype=pool.dtype, device=device),
                          torch.zeros(num_layers, max_rows, H, D, dtype=pool.dtype, device=device),
                          torch.full((num_layers, max_rows, H), -math.inf, dtype=torch.float32, device=device))

    def _new_ragged(self) -> RaggedDecode:
        device = self.pool.device
        if not self.cuda_graph:
            return RaggedDecode(device, workspace=self.workspace)
        rows = self.max_rows * self.num_kv_heads  # one kernel row per (row, KV head); dummies for empty ones
        return RaggedDecode(device, workspace=self.workspace, cuda_graph=True, max_rows=rows,
                            max_pages=self.max_pages * self.index_unit + rows)

    def plan(self, rows: RaggedRows) -> None:
        pool = self.pool
        dtype, D = pool.dtype, pool.head_dim
        R = rows.num_rows
        if self.cuda_graph and R > self.max_rows:
            raise ValueError(f"{R} compressed rows, the graphed kernel holds at most {self.max_rows}")
        if rows.prompt_key() != self._prompt_key:
            self._plan_prompt(rows.records)
            self._prompt_key = rows.prompt_key()
        indptr, slots = rows.tail_indptr.to(torch.int32), rows.tail_slots.to("cpu", torch.int32)
        if self.cuda_graph:
            if slots.numel() > self.max_tail:
                raise ValueError(f"{slots.numel()} tail slots, the graphed kernel holds at most {self.max_tail}")
            pad = self.max_rows - R  # padding rows read slot 0; their outputs are not used
            indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
            slots = torch.cat([slots, torch.zeros(pad, dtype=torch.int32)])
        last = torch.ones(indptr.numel() - 1, dtype=torch.int32)
        self._tail.plan(indptr, slots, last, self.num_q_heads, self.num_kv_heads, D, 1, dtype, self.scale)
        self.rows = rows

    def _plan_prompt(self, records) -> None:
        """Every layer's prompt rows, from one assembly of the records' cached pieces: per layer
        only FlashInfer's own plan is called."""
        if not records and self.cuda_graph:  # a graph's capture, or a batch with no compressed row
            self._plan_padding()
            return
        bt = self.tables.batch(records, pad_to=self.max_rows if self.cuda_graph else None)
        if bt.values_only:  # the plugin refuses pod before this
            raise NotImplementedError("PoD's values-only rows have no FlashInfer kernel: "
                                      "HEADKV_SGLANG_RAGGED_KERNEL=torch")
        if bt.kv_indptr.shape[0] != self.num_layers:
            raise ValueError(f"the records have {bt.kv_indptr.shape[0]} layers, the kernel {self.num_layers}")
        if self.cuda_graph:
            worst = max(range(self.num_layers), key=lambda l: bt.pages[l])
            if bt.pages[worst] > self.max_pages:
                raise ValueError(f"layer {worst} needs {bt.pages[worst]} pages, the graphed kernel holds at most "
                                 f"{self.max_pages}")
        pool = self.pool
        layers = bt.per_layer()
        if self.shared:  # 1-token pages at their rows: one physical mapping for every layer's addresses
            tables = [token_tables(indptr, indices, last, pool.page_size) for indptr, indices, last, _, _ in layers]
            rows = pool.physical(torch.cat([addr for _, addr, _ in tables])).to(torch.int32)
            rows = rows.split([addr.numel() for _, addr, _ in tables])
            layers = [(indptr, r, last, empty, any_empty)
                      for (indptr, _, last), r, (_, _, _, empty, any_empty) in zip(tables, rows, layers)]
        ps = 1 if self.shared else pool.page_size
        for wrapper, (indptr, indices, last, empty, any_empty) in zip(self._ragged, layers):
            wrapper.plan_rows(indptr, indices, last, empty, any_empty, self.num_kv_heads, self.group, pool.head_dim,
                              ps, pool.dtype, self.scale)
        if not self.cuda_graph:
            self._comp = bt.comp
            return
        ck, cv, bias = self._comp
        if bt.comp is None:
            bias.fill_(-math.inf)
        else:  # padded to max_rows by the assembly
            ck.copy_(bt.comp[0])
            cv.copy_(bt.comp[1])
            bias.copy_(bt.comp[2])

    def _plan_padding(self) -> None:
        """Graphed, no compressed row: every row padding (one dummy token of page 0, masked)."""
        pool, n = self.pool, self.max_rows * self.num_kv_heads
        indptr = torch.arange(n + 1, dtype=torch.int32)
        ids = torch.zeros(n, dtype=torch.int32, device=pool.device)
        last = torch.ones(n, dtype=torch.int32)
        empty = torch.ones(n, dtype=torch.bool, device=pool.device)
        ps = 1 if self.shared else pool.page_size
        for wrapper in self._ragged:
            wrapper.plan_rows(indptr, ids, last, empty, True, self.num_kv_heads, self.group, pool.head_dim,
                              ps, pool.dtype, self.scale)
        self._comp[2].fill_(-math.inf)

    def run(self, layer: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            scale: float) -> torch.Tensor:
        if self.cuda_graph:  # the padded batch: max_rows rows, the planned ones first
            if self.rows is None:
                raise RuntimeError("RaggedAttention.run() before plan()")
            if q.dim() != 3 or q.shape[0] != self.max_rows or q.shape[1] != self.num_q_heads:
                raise ValueError(f"a graphed kernel runs q of [max_rows={self.max_rows}, {self.num_q_heads}, D], "
                                 f"got {list(q.shape)}")
        else:
            self._check_run(layer, q)
        if not math.isclose(scale, self.scale, rel_tol=1e-6):
            raise ValueError(f"layer {layer} has scale {scale}, the plan was made for {self.scale} "
                             "(FlashInfer fixes sm_scale at plan time)")
        R, Hq, D = q.shape
        H, G = self.num_kv_heads, self.group
        q = q.contiguous()
        pool = self.pool
        if self.shared:  # [rows, 1, D]: 1-token pages at the planned physical rows
            k_pages, v_pages = pool.k_flat.unsqueeze(1), pool.v_flat.unsqueeze(1)
        else:
            k_pages, v_pages = pool.k_pages, pool.v_pages
        o_p, lse_p = self._ragged[layer].run(q.view(R, H, G, D), k_pages, v_pages)
        o_t, lse_t = self._tail.run(q, k_buffer.unsqueeze(1), v_buffer.unsqueeze(1))
        o, lse = merge_states(o_p.reshape(R, Hq, D), lse_p.reshape(R, Hq), o_t, lse_t)
        comp = self._comp
        if comp is not None:
            ck, cv, bias = comp[0][layer], comp[1][layer], comp[2][layer]  # [R, H, D], [R, H, D], [R, H]
            lc = torch.einsum("rhgd,rhd->rhg", q.view(R, H, G, D).float(), ck.float()) * scale + bias[:, :, None]
            o_c = cv.float()[:, :, None, :].expand(R, H, G, D).reshape(R, Hq, D)
            o, lse = merge_states(o, lse, o_c, lc.reshape(R, Hq))
        return o.to(q.dtype)
