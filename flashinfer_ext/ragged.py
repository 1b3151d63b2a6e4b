"""FlashInferRaggedAttention: the GPU kernel behind ``headkv_sglang.kv.ragged.RaggedAttention``.

Per layer, for the planned compressed rows:

* prompt pages: :class:`~flashinfer_ext.decode.RaggedDecode`, one ``num_kv_heads=1`` row per
  (row, KV head); one wrapper per layer, planned only when the batch's records change
  (pages do not change while a request decodes);
* tail: :class:`~flashinfer_ext.decode.DenseDecode` over SGLang's token pool viewed as
  1-token pages (``[slots, 1, Hkv, D]``), indices = the tail slots; planned once per
  batch (shared by every layer);
* Razor's compensation: one extra logit ``q·k_c·scale + log(n_dropped)`` per (row, head),
  in torch;

merged by log-sum-exp. The float workspace is shared by all wrappers (layers run one
after another on one stream); each wrapper keeps its own plan.

Imports FlashInfer on first use; nothing here imports SGLang.
"""

from __future__ import annotations

import math

import torch

from flashinfer_ext.decode import DenseDecode, RaggedDecode
from flashinfer_ext.plan import build_decode_plan
from headkv_sglang.kv.pool import RaggedHeadKVPool
from headkv_sglang.kv.ragged import RaggedAttention, RaggedRows, stack_compensation
from headkv_sglang.reference import merge_states


class FlashInferRaggedAttention(RaggedAttention):
    """RaggedAttention on CUDA through FlashInfer (see the module docstring).

    ``scale`` is fixed at plan time (FlashInfer plans ``sm_scale``): ``run`` checks that
    the layer's scale matches.
    """

    def __init__(self, pool: RaggedHeadKVPool, num_layers: int, num_kv_heads: int, num_q_heads: int,
                 scale: float, *, workspace_bytes: int = 256 << 20) -> None:
        super().__init__(pool, num_layers, num_kv_heads)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_q_heads, self.scale = num_q_heads, scale
        self.group = num_q_heads // num_kv_heads
        device = pool.k_pages.device
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._ragged: list[RaggedDecode | None] = [None] * num_layers
        self._tail = DenseDecode(device, workspace=self.workspace)
        self._prompt_key: tuple[int, ...] | None = None
        self._comp: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def plan(self, rows: RaggedRows) -> None:
        pool = self.pool
        dtype, D = pool.dtype, pool.head_dim
        if rows.prompt_key() != self._prompt_key:
            for layer in range(self.num_layers):
                lps = [rec.layers[layer] for rec in rows.records]
                if self._ragged[layer] is None:
                    self._ragged[layer] = RaggedDecode(pool.k_pages.device, workspace=self.workspace)
                self._ragged[layer].plan(build_decode_plan(lps, pool.page_size), self.group, D, dtype, self.scale)
                self._comp[layer] = stack_compensation(lps, self.num_kv_heads, D, dtype, pool.k_pages.device)
            self._prompt_key = rows.prompt_key()
        R = rows.num_rows
        last = torch.ones(R, dtype=torch.int32)
        self._tail.plan(rows.tail_indptr.to(torch.int32), rows.tail_slots.to(torch.int32), last,
                        self.num_q_heads, self.num_kv_heads, D, 1, dtype, self.scale)
        self.rows = rows

    def run(self, layer: int, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            scale: float) -> torch.Tensor:
        self._check_run(layer, q)
        if not math.isclose(scale, self.scale, rel_tol=1e-6):
            raise ValueError(f"layer {layer} has scale {scale}, the plan was made for {self.scale} "
                             "(FlashInfer fixes sm_scale at plan time)")
        R, Hq, D = q.shape
        H, G = self.num_kv_heads, self.group
        q = q.contiguous()
        o_p, lse_p = self._ragged[layer].run(q.view(R, H, G, D), self.pool.k_pages, self.pool.v_pages)
        o_t, lse_t = self._tail.run(q, k_buffer.unsqueeze(1), v_buffer.unsqueeze(1))
        o, lse = merge_states(o_p.reshape(R, Hq, D), lse_p.reshape(R, Hq), o_t, lse_t)
        comp = self._comp[layer]
        if comp is not None:
            ck, cv, bias = comp  # [R, H, D], [R, H, D], [R, H]
            lc = torch.einsum("rhgd,rhd->rhg", q.view(R, H, G, D).float(), ck.float()) * scale + bias[:, :, None]
            o_c = cv.float()[:, :, None, :].expand(R, H, G, D).reshape(R, Hq, D)
            o, lse = merge_states(o, lse, o_c, lc.reshape(R, Hq))
        return o.to(q.dtype)
