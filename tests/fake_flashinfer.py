"""A torch stand-in for FlashInfer's paged decode wrapper, for the CPU tests of our glue.

FlashInfer cannot be installed on the CPU CI machine. This stand-in has the surface
``flashinfer_ext.decode`` uses — ``BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD",
use_cuda_graph=..., paged_kv_*_buffer=...)`` with ``plan(...)`` and ``run(q, (k, v), out=,
lse=, return_lse=True)`` — and FlashInfer's contract: CSR pages of ``page_size`` tokens, the
last page holding ``kv_last_page_len`` tokens, GQA by ``num_qo_heads // num_kv_heads``,
base-2 log-sum-exp, no empty rows, a fixed batch size in CUDA-graph mode. It computes with
:func:`headkv_sglang.reference.attend`, so everything above it (empty-row dummies, padding,
merges, compensation) is checked on the CPU; the real kernel is checked on a GPU by
``tests/test_flashinfer_ragged.py``.
"""

from __future__ import annotations

import math
import types

import torch

from headkv_sglang.reference import attend


class BatchDecodeWithPagedKVCacheWrapper:
    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False, backend="fa2",
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert layout == "NHD"
        self.graph = use_cuda_graph
        self.bufs = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             pos_encoding_mode, q_data_type, kv_data_type, sm_scale, **_):
        for t in (indptr, last):  # FlashInfer reads these on the host; indices it only copies to the device
            assert t.device.type == "cpu" and t.dtype == torch.int32, "FlashInfer plans from int32 host tables"
        assert indices.dtype == torch.int32, f"page ids must be int32, got {indices.dtype}"
        if bool((indptr[1:] == indptr[:-1]).any()):
            raise RuntimeError("FlashInfer has no empty rows")
        if self.graph:
            if last.numel() != self.bufs[2].numel():
                raise ValueError("The batch size should be fixed in cudagraph mode")
            if indices.numel() > self.bufs[1].numel():
                raise ValueError("The size of indices should be less than or equal to the allocated buffer")
        self.t = (indptr.long(), indices.long(), last.long(), num_qo_heads, num_kv_heads, page_size, sm_scale)

    def run(self, q, kv, out=None, lse=None, return_lse=True):
        indptr, indices, last, Hq, Hkv, ps, scale = self.t
        k_cache, v_cache = kv  # [pages, page_size, Hkv, D]
        G = Hq // Hkv
        assert q.shape[0] == last.numel() and q.shape[1] == Hq
        for i in range(last.numel()):
            pages = indices[indptr[i]:indptr[i + 1]]
            n = (pages.numel() - 1) * ps + int(last[i])
            k = k_cache[pages].reshape(-1, Hkv, k_cache.shape[-1])[:n]
            v = v_cache[pages].reshape(-1, Hkv, v_cache.shape[-1])[:n]
            for h in range(Hkv):
                o, l = attend(q[i, h * G:(h + 1) * G].float(), k[:, h].float(), v[:, h].float(), scale)
                out[i, h * G:(h + 1) * G] = o.to(out.dtype)
                lse[i, h * G:(h + 1) * G] = l / math.log(2.0)
        return out, lse


def module() -> types.ModuleType:
    m = types.ModuleType("flashinfer")
    m.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    return m
