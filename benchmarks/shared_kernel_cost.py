"""What reading pages out of SGLang's token slots costs the torch ragged kernel (CPU).

The same records (SmolLM2-135M's shape: 30 layers, 3 KV heads, head_dim 64, page 16) in the
separate pool (``--kv-memory split``: one gather of whole pages) and inside borrowed token
slots (``shared``: a gather of head-vectors at planned addresses); plan once, then ``run``
every layer; alternating repeats, medians. Writes benchmarks/results/shared_kernel_cost.{json,md}.

    python benchmarks/shared_kernel_cost.py [--rows 8] [--kept 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from headkv_sglang.kv.pool import LayerPages, RaggedHeadKVPool, RequestPages
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries
from headkv_sglang.kv.shared_memory import BorrowingPageAllocator, SharedPagePool, SlotGeometry, layer_buffers

RESULTS = Path(__file__).parent / "results"


class Slots:
    def __init__(self, size: int) -> None:
        self.free_slots = torch.randperm(size) + 1

    def available_size(self) -> int:
        return self.free_slots.numel()

    def alloc(self, n: int):
        if n > self.free_slots.numel():
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, idx) -> None:
        self.free_slots = torch.cat([self.free_slots, idx])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--kept", type=int, default=128, help="tokens kept per (layer, KV head)")
    ap.add_argument("--tail", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    L, H, Hq, D, ps, size = 30, 3, 9, 64, 16, 16384
    src = Slots(size)
    geo = SlotGeometry.smallest(L, H, ps, rows=size + 1, at_least=8)
    alloc = BorrowingPageAllocator(src, geo, size // geo.chunk_slots)
    k_all, v_all, _, _ = layer_buffers(L, size + 1, H, D, torch.float32, "cpu")
    k_all.normal_()
    v_all.normal_()
    shared = SharedPagePool(k_all, v_all, alloc)
    pages_per_row = (a.kept + ps - 1) // ps
    n = a.rows * L * H * pages_per_row
    split = RaggedHeadKVPool(n, ps, D, torch.float32, "cpu")
    split.k_pages.normal_()
    split.v_pages.normal_()
    recs = {"split": [], "shared": []}
    ids_shared = torch.tensor(alloc.allocate(n, owner="bench"))
    ids_split = torch.randperm(n)
    for name, ids in (("split", ids_split), ("shared", ids_shared)):
        for r in range(a.rows):
            rec = RequestPages(prompt_len=4 * a.kept, policy="bench", budget=a.kept)
            for layer in range(L):
                o = (r * L + layer) * H * pages_per_row
                lp = LayerPages(kv_indptr=torch.arange(H + 1) * pages_per_row,
                                kv_indices=ids[o:o + H * pages_per_row], lengths=torch.full((H,), a.kept))
                lp._page_size = ps
                rec.layers.append(lp)
            rec.page_ids = ids[r * L * H * pages_per_row:(r + 1) * L * H * pages_per_row].tolist()
            recs[name].append(rec)
    tails = src.alloc(a.rows * a.tail)
    req_to_token = torch.zeros(a.rows, 4 * a.kept + a.tail, dtype=torch.int32)
    for r in range(a.rows):
        req_to_token[r, 4 * a.kept:] = tails[r * a.tail:(r + 1) * a.tail].to(torch.int32)
    idxs, starts, ends = list(range(a.rows)), [4 * a.kept] * a.rows, [4 * a.kept + a.tail] * a.rows
    kernels = {"split": TorchRaggedAttention(split, L, H), "shared": TorchRaggedAttention(shared, L, H)}
    q = torch.randn(a.rows, Hq, D)
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {k: {"plan_ms": [], "run_all_layers_ms": []} for k in kernels}
    for _ in range(a.repeats):
        for name, kern in kernels.items():
            kern._prompt_key = None  # a new batch: prompt tables rebuilt
            t0 = time.perf_counter()
            kern.plan(rows_for_queries(recs[name], req_to_token, idxs, starts, ends))
            t1 = time.perf_counter()
            for layer in range(L):
                kern.run(layer, q, k_all[layer], v_all[layer], D ** -0.5)
            t2 = time.perf_counter()
            times[name]["plan_ms"].append(1000 * (t1 - t0))
            times[name]["run_all_layers_ms"].append(1000 * (t2 - t1))
    med = {k: {m: round(statistics.median(v), 2) for m, v in d.items()} for k, d in times.items()}
    out = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(a),
           "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads; shared with other users' jobs (timings noisy)",
           "shape": {"layers": L, "kv_heads": H, "q_heads": Hq, "head_dim": D, "page_size": ps},
           "load_average_before_after": [load_before, os.getloadavg()], "median": med, "all": times}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_kernel_cost.json").write_text(json.dumps(out, indent=2))
    md = ["# Torch ragged kernel: pages in the separate pool vs inside SGLang's token slots", "",
          f"Command: `{out['command']}`  ", f"Machine: {out['machine']}  ",
          f"{a.rows} rows, {a.kept} kept tokens per (layer, KV head), tail {a.tail}, SmolLM2-135M shape, "
          f"medians of {a.repeats} alternating repeats. Load average (1, 5, 15 min) before / after: "
          f"{load_before} / {out['load_average_before_after'][1]} on 2 cores: absolute times are inflated; "
          f"the split/shared ratio is the result.", "",
          "| memory | plan (new batch) ms | run, all 30 layers, ms |", "| --- | --- | --- |"]
    for k in kernels:
        md.append(f"| {k} | {med[k]['plan_ms']} | {med[k]['run_all_layers_ms']} |")
    (RESULTS / "shared_kernel_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
