"""A compressing prefill reads the kept lengths to the host once, not once per layer
(CPU, fast, no server).

``compress_in_forward`` runs one layer right after that layer's attention; on a GPU every
device-to-host read there (``.cpu()``, ``.item()``, ``.tolist()``, ``int(tensor)``) stalls
the forward until the device catches up. The manager's part collects every layer's kept
lengths on the device and reads them in ``finish_compression``, in one transfer. These
tests count the manager's own reads (calls made from ``kv/manager.py``) on CPU tensors,
where the same calls happen, and check that the pages are those of a compression that read
them layer by layer.

Not covered here: ``policies.base.compress_layer`` still calls ``keep.nonzero()``, which on
a GPU waits for the selection of its layer (the number of kept tokens sizes its output).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from headkv_sglang.config import ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.profiles import HeadProfile

from test_compression import Prompt, make_cfg, prefill

MANAGER = ("kv/manager.py", "kv/prefill.py")  # the manager and its prefill-compression part
SHAPE = ModelShape(num_layers=5, num_q_heads=6, num_kv_heads=2, head_dim=8)


@pytest.fixture
def host_reads(monkeypatch):
    """Counter of device-to-host reads made by the manager's code, by the manager method making them."""
    reads: Counter = Counter()

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            f = sys._getframe(1)
            if f.f_code.co_filename.replace("\\", "/").endswith(MANAGER):
                reads[f.f_code.co_name] += 1
            return real(self, *a, **k)
        return wrapper

    for name in ("cpu", "item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return reads


def profile(tmp_path, method: str) -> str:
    scores = torch.rand(SHAPE.num_layers, SHAPE.num_q_heads, generator=torch.Generator().manual_seed(len(method)))
    prof = HeadProfile(architecture="LlamaForCausalLM", model_name="m", num_layers=SHAPE.num_layers,
                       num_q_heads=SHAPE.num_q_heads, num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                       method=method, parameters={}, scores=scores.tolist())
    return str(prof.save(tmp_path / f"{method}.json", heatmap=False))


@pytest.mark.parametrize("policy, budget, method", [("snapkv", 9, None), ("headkv", 11, "r2"), ("adakv", 7, None),
                                                    ("pod", 13, "pod")])
def test_compress_layer_into_reads_nothing_to_the_host(host_reads, tmp_path, policy, budget, method):
    T = 61
    cfg = make_cfg(policy, budget, 4, **({"head_profile": profile(tmp_path, method)} if method else {}))
    p = Prompt(SHAPE, T, seed=budget)
    mgr = CompressionManager(SHAPE, num_pages=900, page_size=3, dtype=torch.float32, device="cpu",
                             only_if_smaller=False)
    prefill(mgr, 2, cfg, p)
    job = mgr.start_compression(2, cfg, T)
    host_reads.clear()
    for layer in range(SHAPE.num_layers):
        mgr.compress_layer_into(job, layer, *p.get_kv(layer))
    assert host_reads == {}, f"per-layer host reads in the manager: {dict(host_reads)}"
    rec = mgr.finish_compression(job)
    assert host_reads["finish_compression"] >= 1
    # the pages every layer took, as the per-layer path counted them
    per_layer = 0
    for lp in rec.layers:
        per_layer += int(mgr.pool.pages_for(lp.lengths).sum())
        if lp.vo_indices is not None:
            per_layer += lp.vo_indices.numel()
    assert per_layer == len(rec.page_ids) == mgr.allocator.used_pages
    assert rec.kept_tokens == sum(int(lp.lengths.sum()) + (0 if lp.vo_lengths is None else int(lp.vo_lengths.sum()))
                                  for lp in rec.layers)
    mgr.check_integrity()
