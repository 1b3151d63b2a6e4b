"""Host cost of OUR part of planning compressed rows, Llama-3-8B shape, on the CPU.

The serving backend calls ``RaggedAttention.plan(rows)`` once per forward batch
(``rows_for_queries`` + ``plan``). This times that call for the GPU serving kernel,
``flashinfer_ext.ragged.FlashInferRaggedAttention``, with FlashInfer's own ``plan`` replaced
by a no-op (its split-KV scheduling and copies are FlashInfer's part, measured on a GPU by
``gpu_decode_step.py``): what remains is ours — page tables per (layer, request, KV head),
empty-row dummies, last-page lengths, Razor compensation stacking, the tail tables. The
device is the CPU, so work the GPU path would run on the device is counted as host time
here (an upper bound).

Shape: ``--layers`` 32 x ``--kv-heads`` 8 (32 query heads, head_dim 128, bf16), ``--requests``
32 compressed requests of ``--context`` prompt tokens kept at ``--budget`` tokens per KV
head on average (log-normal over heads and layers, sigma 1, as HeadKV's skewed budgets;
clamped to [1, context]), pages of ``--page-size``, ``--tail`` decoded tokens each, Razor
compensation on every ``--comp-every``-th request. Cases, each timed as the serving backend
would pay it at a batch change:

* **first plan**: a new kernel (a new server) planning its first batch;
* **unchanged batch**: the next decode step of the same requests (tails one token longer);
* **one in + one out**: a request leaves from the middle of the batch, a new one joins at the
  end (continuous batching's usual step), alternated with the original batch;
* **decode move**: one request's decode-phase compression moved tail tokens into its pages
  (a new record whose every row grew by one page), alternated with the original.

``--baseline REF`` also runs the same cases, in a subprocess, on the code of git ``REF``
(``git archive`` of ``headkv_sglang/`` and ``flashinfer_ext/``), interleaved run by run
with this tree's, and prints both side by side.

    python benchmarks/plan_cost.py --baseline main --out benchmarks/results/plan_cost_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("first plan", "unchanged batch", "one in + one out", "decode move")


class _NoPlanWrapper:
    """FlashInfer's decode wrapper with its plan and run left out: only our tables are timed."""

    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False, backend="fa2", **buffers):
        self.buffers = buffers

    def plan(self, indptr, indices, last, *args, **kwargs):
        self.planned = (indptr, indices, last)


def _stub_flashinfer():
    import flashinfer_ext.decode as decode

    m = types.ModuleType("flashinfer")
    m.BatchDecodeWithPagedKVCacheWrapper = _NoPlanWrapper
    decode._flashinfer = lambda: m


def _fake_pool(num_pages: int, page_size: int, head_dim: int, dtype):
    """A pool object without the storage (planning reads only its shape, dtype and device)."""
    import torch

    from headkv_sglang.kv.pool import RaggedHeadKVPool

    pool = RaggedHeadKVPool.__new__(RaggedHeadKVPool)
    pool.num_pages, pool.page_size, pool.head_dim, pool.dtype = num_pages, page_size, head_dim, dtype
    pool.k_pages = torch.zeros(1, 1, head_dim, dtype=dtype).expand(num_pages, page_size, head_dim)
    pool.v_pages = pool.k_pages
    return pool


def _record(gen, a, cursor: list[int], comp: bool, dtype):
    import torch

    from headkv_sglang.kv.pool import LayerPages, RequestPages

    L, H, ps = a.layers, a.kv_heads, a.page_size
    w = torch.exp(torch.randn(L, H, generator=gen))
    lengths = (w / w.mean() * a.budget).round().clamp(1, a.context).to(torch.int64)
    rec = RequestPages(prompt_len=a.context, policy="headkv", budget=a.budget)
    for layer in range(L):
        ln = lengths[layer].clone()
        pages = (ln + ps - 1) // ps
        indptr = torch.zeros(H + 1, dtype=torch.int64)
        torch.cumsum(pages, 0, out=indptr[1:])
        n = int(pages.sum())
        lp = LayerPages(kv_indptr=indptr, kv_indices=torch.arange(cursor[0], cursor[0] + n, dtype=torch.int64),
                        lengths=ln)
        cursor[0] += n
        if comp:
            lp.comp_k = torch.randn(H, a.head_dim, generator=gen).to(dtype)
            lp.comp_v = torch.randn(H, a.head_dim, generator=gen).to(dtype)
            lp.comp_count = torch.randint(0, 5000, (H,), generator=gen)
        lp._page_size = ps
        rec.layers.append(lp)
        rec.kept_tokens += int(ln.sum())
    return rec


def _grown(rec, a, cursor: list[int]):
    """``rec`` after a decode move: every row holds one page more (decode_kept tokens appended)."""
    import dataclasses

    import torch

    layers = []
    for lp in rec.layers:
        H = lp.lengths.numel()
        parts = []
        for h in range(H):
            parts += [lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])],
                      torch.tensor([cursor[0] + h], dtype=torch.int64)]
        cursor[0] += H
        counts = lp.kv_indptr[1:] - lp.kv_indptr[:-1] + 1
        indptr = torch.zeros(H + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=indptr[1:])
        new = dataclasses.replace(lp, kv_indptr=indptr, kv_indices=torch.cat(parts),
                                  lengths=(lp.lengths + a.page_size - 1) // a.page_size * a.page_size + a.page_size)
        new._page_size = a.page_size
        layers.append(new)
    return dataclasses.replace(rec, layers=layers, tail_start=rec.prompt_len + a.page_size)


def measure(a) -> dict:
    """Times of every case for the kernels in ``a.kernels`` (ms per call, one list per case)."""
    import torch

    from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries

    torch.set_grad_enabled(False)
    torch.set_num_threads(a.threads)
    _stub_flashinfer()
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    dtype = torch.bfloat16
    R, ps = a.requests, a.page_size
    gen = torch.Generator().manual_seed(0)
    cursor = [0]

    def records():
        return [_record(gen, a, cursor, comp=a.comp_every > 0 and r % a.comp_every == 1, dtype=dtype)
                for r in range(R + 1)]

    base = records()
    seq = a.context + a.tail
    width = seq + a.repeats + 2
    req_to_token = torch.zeros(R + 1, width, dtype=torch.int32)
    req_to_token[:, a.context:] = torch.arange((R + 1) * (width - a.context), dtype=torch.int32).view(R + 1, -1)
    grown = _grown(base[R // 2], a, cursor)
    pool = _fake_pool(cursor[0] + 1, ps, a.head_dim, dtype)

    def rows(recs, idxs, step=0):
        return rows_for_queries(recs, req_to_token, idxs, [r.tail_start if r.tail_start >= 0 else r.prompt_len
                                                           for r in recs], [seq + step] * len(recs))

    batch = list(range(R))
    swapped = batch[:R // 3] + batch[R // 3 + 1:] + [R]
    moved_recs = base[:R]
    moved_recs = moved_recs[:R // 2] + [grown] + moved_recs[R // 2 + 1:]

    def new_kernel(name):
        if name == "flashinfer":
            return FlashInferRaggedAttention(pool, a.layers, a.kv_heads, a.q_heads, a.head_dim ** -0.5,
                                             workspace_bytes=8)
        return TorchRaggedAttention(pool, a.layers, a.kv_heads)

    def timed(kernel, recs, idxs, step=0) -> float:
        # CPU time of this thread: what the planning costs the host, not the waits of a shared machine
        t = time.thread_time()
        kernel.plan(rows(recs, idxs, step))
        return 1000 * (time.thread_time() - t)

    out = {}
    for name in a.kernels:
        res = {c: [] for c in CASES}
        for rep in range(a.repeats):
            fresh = records()  # a new server: records it has never planned
            kernel = new_kernel(name)
            res["first plan"].append(timed(kernel, fresh[:R], batch))
            kernel = new_kernel(name)
            kernel.plan(rows(base[:R], batch))
            res["unchanged batch"].append(timed(kernel, base[:R], batch, step=1 + rep))
            res["one in + one out"].append(timed(kernel, [base[i] for i in swapped], swapped))
            timed(kernel, base[:R], batch)
            res["decode move"].append(timed(kernel, moved_recs, batch))
            del kernel, fresh
        out[name] = res
    pages = sum(rec.layers[l].kv_indices.numel() for rec in base[:R] for l in range(a.layers))
    return {"results": out, "pages": pages}


def _baseline_tree(ref: str) -> str:
    d = tempfile.mkdtemp(prefix="plan_cost_")
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "headkv_sglang", "flashinfer_ext"],
                          check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--tail", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--comp-every", type=int, default=4, help="Razor compensation on every N-th request (0: none)")
    p.add_argument("--kernels", nargs="+", default=["flashinfer"], choices=["flashinfer", "torch"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: a serving host's planning "
                   "thread, and steady on a shared machine)")
    p.add_argument("--baseline", default=None, metavar="REF", help="also time git REF's code, side by side")
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)  # the tree to import (baseline subprocess)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args(argv)
    if a.code:  # one tree's run (a subprocess started with PYTHONPATH=CODE): print the times as JSON
        import headkv_sglang

        # the package is imported at interpreter start (its .pth boot hook): PYTHONPATH decides which
        assert Path(headkv_sglang.__file__).resolve().is_relative_to(Path(a.code).resolve()), \
            f"imported {headkv_sglang.__file__}, not the code under {a.code}: run with PYTHONPATH={a.code}"
        print(json.dumps(measure(a)))
        return 0
    import torch

    runs = {}
    base_dir = None
    if a.baseline:
        base_dir = _baseline_tree(a.baseline)
        runs[f"before ({a.baseline})"] = []
    runs["this tree"] = []
    sub_argv = [x for x in (argv if argv is not None else sys.argv[1:])]
    def run_tree(code: str) -> dict:
        env = dict(os.environ, PYTHONPATH=code)
        r = subprocess.run([sys.executable, __file__, *sub_argv, "--code", code], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            raise SystemExit(f"the run on {code} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    for i in range(2 if a.baseline else 1):  # interleave: baseline, this tree, baseline, this tree
        if base_dir:
            runs[f"before ({a.baseline})"].append(run_tree(base_dir))
        runs["this tree"].append(run_tree(str(ROOT)))
    table = {}
    for label, rs in runs.items():
        for kern in a.kernels:
            for case in CASES:
                xs = [x for r in rs for x in r["results"][kern][case]]
                table[(label, kern, case)] = (statistics.median(xs), min(xs), max(xs))
    pages = runs["this tree"][0]["pages"]
    labels = list(runs)
    lines = [f"| kernel | case | " + " | ".join(f"{l} ms (median, min..max)" for l in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for kern in a.kernels:
        for case in CASES:
            cells = [f"{table[(l, kern, case)][0]:.2f} ({table[(l, kern, case)][1]:.2f}..{table[(l, kern, case)][2]:.2f})"
                     for l in labels]
            lines.append(f"| {kern} | {case} | " + " | ".join(cells) + " |")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = (f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} at {a.threads} thread(s), "
               f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{machine}\n{a.layers} layers x {a.kv_heads} KV heads x {a.requests} requests, {pages} prompt pages "
          f"of {a.page_size} tokens in the batch\n" + "\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/plan_cost.py " + " ".join(sub_argv)
        out.with_suffix(".json").write_text(json.dumps(
            {"args": vars(a), "machine": machine, "pages": pages,
             "runs": {l: [r["results"] for r in rs] for l, rs in runs.items()}}, indent=1))
        out.with_suffix(".md").write_text(
            f"# Host cost of our part of planning compressed rows (CPU)\n\nMachine: {machine}.\n"
            f"Command: `{cmd}`\n\n{a.layers} layers x {a.kv_heads} KV heads ({a.q_heads} query heads, head_dim "
            f"{a.head_dim}, bf16) x {a.requests} compressed requests of {a.context} prompt tokens kept at "
            f"{a.budget} tokens per KV head on average (log-normal), {pages} prompt pages of {a.page_size} tokens "
            f"in the batch, {a.tail}-token tails, Razor compensation on every {a.comp_every}-th request. "
            f"`rows_for_queries` + `plan`, FlashInfer's own plan left out; CPU time of the planning thread "
            f"(`time.thread_time`), {a.repeats} repeats per process, "
            f"{len(runs['this tree'])} process(es) per tree, interleaved.\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
