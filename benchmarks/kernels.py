"""GPU kernels: ragged per-head decode attention vs dense FlashInfer decode, and compression cost.

One decode layer of a Llama-3-8B-shaped model (32 query heads, 8 KV heads, head_dim 128,
bf16, 16-token pages), side by side in one run; both sides are captured in CUDA graphs (as
SGLang decodes) and timed with CUDA events, eager calls reported beside them:

* dense: FlashInfer GQA decode over the full KV (every request keeps all ``context`` tokens);
* ragged: :class:`flashinfer_ext.decode.RaggedDecode`, one row per (request, KV head) keeping
  ``retention`` of the context on average, either the same for every head ("uniform") or
  spread like HeadKV's budgets ("skewed": log-normal over heads, a few heads keep much more);
* achieved bandwidth = KV bytes read / time, against a measured device-to-device copy
  (bytes read + written / time);
* plan overhead (building the CSR tables from the pool's page tables on the host +
  FlashInfer's plan), and kernel variants for the ragged rows (split-KV off, 64-token pages,
  rows cut into chunks, tensor cores);
* attention-only capacity at a fixed KV memory: requests that fit with full KV vs headkv and
  one decode step's attention over all of them (ragged rows + dense tail + merge);
* compression of a whole 32-layer prompt on the device (torch path: window scores,
  pooling, per-head top-k, page writes).

Needs a CUDA device and flashinfer-python; writes ``<out>.json``, ``<out>.md``, ``<out>.png``.
``scripts/gpu_check.sh`` runs it with the GPU tests.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flashinfer_ext.decode import DenseDecode, RaggedDecode  # noqa: E402
from flashinfer_ext.plan import build_decode_plan, split_rows  # noqa: E402
from headkv_sglang.kv.pool import LayerPages  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
G = HQ // HKV
DT = torch.bfloat16
SCALE = 1 / math.sqrt(D)


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import flashinfer
        fi = flashinfer.__version__
    except Exception:  # pragma: no cover
        fi = None
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "flashinfer": fi, "python": platform.python_version(), "host": platform.machine()}


def cuda_time_ms(fn, iters: int = 50, trials: int = 5, warmup: int = 5) -> float:
    """Median over ``trials`` of the mean time of ``iters`` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, iters: int = 20, trials: int = 5) -> float:
    """GPU time per call: ``iters`` calls captured in one CUDA graph (no launch overhead), replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    return cuda_time_ms(g.replay, iters=1, trials=trials, warmup=2) / iters


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=DT, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10, trials=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def row_lengths(batch: int, context: int, retention: float, spread: str, gen: torch.Generator) -> torch.Tensor:
    """Tokens kept per (request, KV head): mean ``retention * context``, at least 32, at most ``context``."""
    mean = max(32, round(retention * context))
    rows = batch * HKV
    if spread == "uniform":
        return torch.full((rows,), mean, dtype=torch.int64)
    w = torch.exp(torch.randn(rows, generator=gen, dtype=torch.float64) * 1.2)
    lengths = (w / w.mean() * mean).round().clamp(32, context).to(torch.int64)
    return lengths


def layer_pages(lengths: torch.Tensor, gen: torch.Generator, page: int = PAGE) -> tuple[list[LayerPages], int]:
    """Per-request page tables over a pool whose pages are handed out in random order."""
    pages = (lengths + page - 1) // page
    total = int(pages.sum())
    perm = torch.randperm(total, generator=gen)
    out, at = [], 0
    for r in range(lengths.numel() // HKV):
        ln = lengths[r * HKV:(r + 1) * HKV]
        pg = pages[r * HKV:(r + 1) * HKV]
        indptr = torch.zeros(HKV + 1, dtype=torch.int64)
        torch.cumsum(pg, 0, out=indptr[1:])
        n = int(indptr[-1])
        out.append(LayerPages(kv_indptr=indptr, kv_indices=perm[at:at + n], lengths=ln))
        at += n
    return out, total


def dense_point(batch: int, context: int, gen: torch.Generator, iters: int) -> dict:
    pages_per_req = context // PAGE
    n_pages = batch * pages_per_req
    k = torch.randn(n_pages, PAGE, HKV, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages_per_req
    indices = torch.randperm(n_pages, generator=gen).to(torch.int32)
    last = torch.full((batch,), PAGE, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, dtype=DT, device="cuda")
    dd = DenseDecode("cuda", cuda_graph=True, max_rows=batch, max_pages=n_pages)
    dd.plan(indptr, indices, last, HQ, HKV, D, PAGE, DT, SCALE)
    res = {"graph_ms": graph_time_ms(lambda: dd.run(q, k, v)),
           "eager_ms": cuda_time_ms(lambda: dd.run(q, k, v), iters=iters)}
    res["gbs"] = 2 * batch * context * HKV * D * 2 / (res["graph_ms"] * 1e-3) / 1e9
    return res


def graphed_ragged(lps: list[LayerPages], total: int, page: int = PAGE, chunk_pages: int = 0,
                   tensor_cores: bool = False) -> tuple[RaggedDecode, object]:
    """A CUDA-graph-ready RaggedDecode sized for these page tables, and their plan."""
    plan = build_decode_plan(lps, page)
    rows = plan.num_rows
    chunks = split_rows(plan, chunk_pages).num_chunks if chunk_pages else 0
    return RaggedDecode("cuda", cuda_graph=True, max_rows=rows, max_pages=total + rows, chunk_pages=chunk_pages,
                        max_chunks=chunks, use_tensor_cores=tensor_cores), plan


def ragged_point(batch: int, context: int, retention: float, spread: str, gen: torch.Generator, iters: int,
                 page: int = PAGE, tensor_cores: bool = False, chunk_pages: int = 0, **options) -> dict:
    lengths = row_lengths(batch, context, retention, spread, gen)
    lps, total = layer_pages(lengths, gen, page)
    kp = torch.randn(total, page, D, dtype=DT, device="cuda")
    vp = torch.randn_like(kp)
    q = torch.randn(batch, HKV, G, D, dtype=DT, device="cuda")
    rows = batch * HKV
    rd, plan = graphed_ragged(lps, total, page, chunk_pages, tensor_cores)
    rd.plan(plan, G, D, DT, SCALE, **options)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        plan = build_decode_plan(lps, page)
    t1 = time.perf_counter()
    for _ in range(reps):
        rd.plan(plan, G, D, DT, SCALE, **options)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    kept = int(lengths.sum())
    res = {"graph_ms": graph_time_ms(lambda: rd.run(q, kp, vp)),
           "eager_ms": cuda_time_ms(lambda: rd.run(q, kp, vp), iters=iters),
           "kept_fraction": kept / (rows * context), "max_row": int(lengths.max()),
           "build_tables_ms": (t1 - t0) / reps * 1e3, "flashinfer_plan_ms": (t2 - t1) / reps * 1e3}
    res["gbs"] = 2 * kept * D * 2 / (res["graph_ms"] * 1e-3) / 1e9
    return res


def bench_point(batch: int, context: int, retention: float, gen: torch.Generator, iters: int) -> dict:
    res = {"batch": batch, "context": context, "retention": retention,
           "dense": dense_point(batch, context, gen, iters)}
    torch.cuda.empty_cache()
    for spread in ("uniform", "skewed"):
        r = ragged_point(batch, context, retention, spread, gen, iters)
        r["speedup"] = res["dense"]["graph_ms"] / r["graph_ms"]
        r["eager_speedup"] = res["dense"]["eager_ms"] / r["eager_ms"]
        res[spread] = r
        torch.cuda.empty_cache()
    return res


def bench_variants(batch: int, context: int, retention: float, gen: torch.Generator, iters: int) -> list[dict]:
    """Kernel choices for the ragged rows at one point (skewed budgets)."""
    out = []
    for name, kw in (("CUDA cores, 16-token pages", {}),
                     ("CUDA cores, 16-token pages, no split-KV", {"disable_split_kv": True}),
                     ("CUDA cores, 64-token pages", {"page": 64}),
                     ("CUDA cores, rows cut into chunks of 16 pages", {"chunk_pages": 16}),
                     ("CUDA cores, rows cut into chunks of 64 pages", {"chunk_pages": 64}),
                     ("tensor cores, 16-token pages", {"tensor_cores": True})):
        t0 = time.time()
        try:
            r = ragged_point(batch, context, retention, "skewed", gen, iters, **kw)
            r["variant"] = name
        except Exception as e:
            traceback.print_exc()
            r = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
        r["wall_s"] = time.time() - t0
        out.append(r)
        torch.cuda.empty_cache()
    return out


def bench_capacity(kv_gib: float, context: int, budget: int, tail: int, gen: torch.Generator) -> dict:
    """Attention-only capacity at a fixed KV memory for all 32 layers (not the server).

    Full KV: each request holds ``context + tail`` tokens per KV head. headkv: ``budget`` prompt
    tokens per KV head on average (skewed over heads) in the ragged pool + the same dense
    ``tail`` of decoded tokens. Requests = memory // bytes per request; a decode step = 32 layers
    of attention for all of them (headkv: ragged prompt rows + dense tail + merge), CUDA graphs.
    """
    from flashinfer_ext.decode import merge

    layers = 32
    per_token = layers * HKV * D * 2 * 2  # K and V, bf16, every layer
    mem = kv_gib * 2**30
    n_full = int(mem // (per_token * (context + tail)))
    n_head = int(mem // (per_token * (budget + tail)))
    res = {"kv_gib": kv_gib, "context": context, "budget": budget, "tail": tail, "layers": layers,
           "full_requests": n_full, "headkv_requests": n_head}
    d = dense_point(n_full, context + tail, gen, 10) if n_full else None
    res["full_layer_ms"] = d["graph_ms"] if d else None
    torch.cuda.empty_cache()
    # headkv: ragged prompt rows + dense tail pages + merge, captured together
    lengths = row_lengths(n_head, context, budget / context, "skewed", gen)
    lps, total = layer_pages(lengths, gen)
    kp = torch.randn(total, PAGE, D, dtype=DT, device="cuda")
    vp = torch.randn_like(kp)
    tail_pages = tail // PAGE
    kt = torch.randn(n_head * tail_pages, PAGE, HKV, D, dtype=DT, device="cuda")
    vt = torch.randn_like(kt)
    dd = DenseDecode("cuda", cuda_graph=True, max_rows=n_head, max_pages=n_head * tail_pages)
    dd.plan(torch.arange(n_head + 1, dtype=torch.int32) * tail_pages,
            torch.randperm(n_head * tail_pages, generator=gen).to(torch.int32),
            torch.full((n_head,), PAGE, dtype=torch.int32), HQ, HKV, D, PAGE, DT, SCALE)
    q = torch.randn(n_head, HQ, D, dtype=DT, device="cuda")
    qr = q.view(n_head, HKV, G, D)
    res["longest_row"] = int(lengths.max())
    res["headkv_kept_fraction"] = int(lengths.sum()) / (n_head * HKV * context)
    if d:
        res["full_tokens_per_s"] = n_full / (layers * res["full_layer_ms"] * 1e-3)
    res["headkv"] = {}
    for chunk in (0, 64):
        rd, plan = graphed_ragged(lps, total, PAGE, chunk)
        rd.plan(plan, G, D, DT, SCALE)

        def step(rd=rd):
            o_p, lse_p = rd.run(qr, kp, vp)
            o_t, lse_t = dd.run(q, kt, vt)
            return merge(o_p, lse_p, o_t, lse_t)

        layer_ms = graph_time_ms(step)
        res["headkv"]["chunks_64" if chunk else "whole"] = {"layer_ms": layer_ms, "ragged_ms": graph_time_ms(lambda rd=rd: rd.run(qr, kp, vp)),
                                "tokens_per_s": n_head / (layers * layer_ms * 1e-3)}
    o_p, lse_p = rd.run(qr, kp, vp)
    o_t, lse_t = dd.run(q, kt, vt)
    res["tail_ms"] = graph_time_ms(lambda: dd.run(q, kt, vt))
    res["merge_ms"] = graph_time_ms(lambda: merge(o_p, lse_p, o_t, lse_t))
    uni = row_lengths(n_head, context, budget / context, "uniform", gen)
    lps_u, total_u = layer_pages(uni, gen)
    kp_u = torch.randn(total_u, PAGE, D, dtype=DT, device="cuda")
    vp_u = torch.randn_like(kp_u)
    rd_u, plan_u = graphed_ragged(lps_u, total_u)
    rd_u.plan(plan_u, G, D, DT, SCALE)
    res["ragged_uniform_ms"] = graph_time_ms(lambda: rd_u.run(qr, kp_u, vp_u))
    return res


def bench_compression(context: int, budget: int, policy: str) -> dict:
    from headkv_sglang.kv.manager import CompressionManager
    from headkv_sglang.config import KVPolicyConfig, ModelShape

    layers = 32
    shape = ModelShape(num_layers=layers, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D)
    cfg = KVPolicyConfig(policy=policy, budget=budget)
    w = cfg.obs_window
    k = torch.randn(context, HKV, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(w, HQ, D, dtype=DT, device="cuda")
    num_pages = layers * HKV * (context // PAGE + 1)
    mgr = CompressionManager(shape, num_pages=num_pages, page_size=PAGE, dtype=DT, device="cuda")
    times = []
    for rep in range(3):
        mgr.begin_extend(rep, f"r{rep}", window=w)
        for layer in range(layers):
            mgr.capture_queries(layer, rep, q)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec = mgr.compress(rep, cfg, context, lambda layer: (k, v))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        kept = rec.kept_tokens
        mgr.free(rep)
    mgr.check_integrity()
    assert mgr.allocator.used_pages == 0, "compression benchmark leaked pages"
    return {"policy": policy, "context": context, "budget": budget, "layers": layers,
            "seconds": sorted(times)[1], "all_seconds": times, "kept_fraction": kept / (layers * HKV * context)}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p["batch"] for p in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), sharey=True)
    axes = [axes] if len(batches) == 1 else axes
    for ax, b in zip(axes, batches):
        pts = sorted((p for p in points if p["batch"] == b), key=lambda p: p["context"])
        xs = [p["context"] for p in pts]
        for spread, style in (("uniform", "o-"), ("skewed", "s--")):
            ax.plot(xs, [p[spread]["speedup"] for p in pts], style, label=f"ragged, {spread}")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context (tokens)")
    axes[0].set_ylabel("dense time / ragged time (CUDA graphs)")
    axes[0].legend()
    fig.suptitle(f"decode attention, one layer, {points[0]['retention']:.0%} of the KV kept on average")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(res: dict) -> str:
    m = res["machine"]
    cb = res.get("copy_gbs") or float("nan")
    lines = ["# Kernel benchmark: ragged per-head decode vs dense FlashInfer decode", "",
             f"Machine: {m['gpu']} ({m['gpu_memory_gib']} GiB, {m['sms']} SMs), torch {m['torch']} "
             f"(CUDA {m['cuda']}), flashinfer {m['flashinfer']}, Python {m['python']}.",
             f"Command: `{res['command']}` (via `scripts/gpu_check.sh`).", "",
             f"One decode layer of a Llama-3-8B-shaped model: {HQ} query heads, {HKV} KV heads, head_dim {D}, "
             f"bf16, {PAGE}-token pages, pages in random order. Dense = FlashInfer GQA decode over the full KV; "
             "ragged = `flashinfer_ext.decode.RaggedDecode`, one `num_kv_heads=1` row per (request, KV head), "
             f"keeping {res['retention']:.0%} of the context per head on average — the same for every head "
             "(uniform) or log-normal over heads like HeadKV's budgets (skewed; the longest row is listed). "
             "Times are GPU time per call with both sides captured in CUDA graphs (as SGLang decodes; median "
             "of 5 replays of 20 calls); eager = back-to-back calls from Python, launch overhead included. "
             "GB/s = KV bytes read / graph time.", ""]
    if "copy_gbs" in res:
        lines += [f"Device-to-device copy: **{cb:.0f} GB/s** (bytes read + written), the bandwidth reference.", ""]
    if res.get("points"):
        lines += ["| batch | context | dense ms | dense GB/s | uniform ms | speedup | GB/s (% of copy) | "
                  "skewed ms | speedup | GB/s (% of copy) | longest row | eager speedup (skewed) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in res["points"]:
            d, u, s = p["dense"], p["uniform"], p["skewed"]
            lines.append(
                f"| {p['batch']} | {p['context']} | {d['graph_ms']:.4f} | {d['gbs']:.0f} | {u['graph_ms']:.4f} | "
                f"{u['speedup']:.1f}x | {u['gbs']:.0f} ({u['gbs'] / cb:.0%}) | {s['graph_ms']:.4f} | "
                f"{s['speedup']:.1f}x | {s['gbs']:.0f} ({s['gbs'] / cb:.0%}) | {s['max_row']} | "
                f"{s['eager_speedup']:.1f}x |")
        big = max(res["points"], key=lambda p: (p["batch"], p["context"]))["skewed"]
        lines += ["", f"Plan cost at the largest point (host): building the CSR tables from the pool's page "
                  f"tables {big['build_tables_ms']:.2f} ms + FlashInfer's plan {big['flashinfer_plan_ms']:.2f} ms "
                  "per layer. The compressed rows do not change while a request decodes, so this is paid when "
                  "the batch changes, not every step.", "", f"![speedup]({Path(res['out']).name}.png)", ""]
    if res.get("variants"):
        lines += [f"Kernel choices for the ragged rows (batch {res['variant_point'][0]}, context "
                  f"{res['variant_point'][1]}, skewed):", "", "| variant | graph ms | GB/s (% of copy) | eager ms |",
                  "|---|---|---|---|"]
        for v in res["variants"]:
            if "error" in v:
                lines.append(f"| {v['variant']} | error: `{v['error'][:120]}` | | |")
            else:
                lines.append(f"| {v['variant']} | {v['graph_ms']:.4f} | {v['gbs']:.0f} ({v['gbs'] / cb:.0%}) | "
                             f"{v['eager_ms']:.4f} |")
        lines.append("")
    c = res.get("capacity")
    if c and c.get("headkv"):
        h0, h64 = c["headkv"]["whole"], c["headkv"]["chunks_64"]
        full = (f"full {c['layers'] * c['full_layer_ms']:.2f} ms for {c['full_requests']} tokens = "
                f"{c['full_tokens_per_s']:.0f} tok/s" if c.get("full_tokens_per_s") else "full: no request fits")
        lines += [f"**Capacity at a fixed KV memory (attention only, not the server)**: {c['kv_gib']:.0f} GiB of KV "
                  f"for {c['layers']} layers, {c['context']}-token prompts, {c['tail']} decoded tokens each. Full KV "
                  f"holds {c['full_requests']} requests; headkv at budget {c['budget']} (skewed over heads, "
                  f"{c['headkv_kept_fraction']:.1%} of the prompt kept, longest row {c['longest_row']} tokens) holds "
                  f"{c['headkv_requests']} ({c['headkv_requests'] / max(c['full_requests'], 1):.1f}x). One decode "
                  f"step's attention over all of them ({c['layers']} layers, CUDA graphs; headkv = ragged prompt "
                  f"rows + dense tail + merge): {full}; headkv "
                  f"{c['layers'] * h0['layer_ms']:.2f} ms = {h0['tokens_per_s']:.0f} tok/s with whole rows, "
                  f"{c['layers'] * h64['layer_ms']:.2f} ms = {h64['tokens_per_s']:.0f} tok/s with rows cut into "
                  f"64-page chunks"
                  + (f" ({h0['tokens_per_s'] / c['full_tokens_per_s']:.1f}x and "
                     f"{h64['tokens_per_s'] / c['full_tokens_per_s']:.1f}x full KV)." if c.get("full_tokens_per_s")
                     else "."), "",
                  f"Per layer (ms): ragged rows {h0['ragged_ms']:.3f} whole, {h64['ragged_ms']:.3f} chunked "
                  f"(uniform budgets, whole rows: {c['ragged_uniform_ms']:.3f}); dense tail {c['tail_ms']:.3f}; "
                  f"merge {c['merge_ms']:.3f}.", ""]
    for c in res.get("compression", []):
        lines.append(f"Compression on the GPU (torch path: window scores, pooling, per-head top-k, page writes), "
                     f"{c['policy']} budget {c['budget']} of a {c['context']}-token prompt, {c['layers']} layers: "
                     f"{c['seconds'] * 1e3:.0f} ms ({c['seconds'] / c['layers'] * 1e3:.1f} ms per layer; kept "
                     f"{c['kept_fraction']:.1%}).")
    for e in res.get("errors", []):
        lines += ["", f"Error in {e['section']}: `{e['error']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--retention", type=float, default=0.05, help="mean share of the context kept per head")
    p.add_argument("--iters", type=int, default=50, help="calls per eager timing trial")
    p.add_argument("--kv-gib", type=float, default=40.0, help="KV memory of the capacity comparison (all layers)")
    p.add_argument("--capacity-budget", type=int, default=1024,
                   help="headkv tokens per KV head in the capacity comparison (--kv-budget)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/kernels_gpu"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    if not 0 < args.retention <= 1:
        p.error(f"--retention must be in (0, 1], got {args.retention}")
    bad = [c for c in args.contexts if c <= 0 or c % PAGE]
    if bad:
        p.error(f"--contexts must be positive multiples of {PAGE}, got {bad}")
    gen = torch.Generator().manual_seed(0)
    res: dict = {"machine": machine(), "command": "python benchmarks/kernels.py " + " ".join(argv or sys.argv[1:]),
                 "out": args.out, "retention": args.retention, "points": [], "errors": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(report(res))

    def section(name, fn):
        t0 = time.time()
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            res["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}"[:500]})
        print(f"[kernels] {name}: {time.time() - t0:.1f} s", flush=True)
        save()

    section("copy bandwidth", lambda: res.__setitem__("copy_gbs", copy_bandwidth_gbs()))
    for b in args.batches:
        for c in args.contexts:
            section(f"decode b={b} ctx={c}",
                    lambda b=b, c=c: res["points"].append(bench_point(b, c, args.retention, gen, args.iters)))
    section("capacity", lambda: res.__setitem__("capacity", bench_capacity(
        args.kv_gib, max(args.contexts), args.capacity_budget, 256, gen)))
    res["compression"] = []
    for pol in ("snapkv", "adakv"):
        section(f"compression {pol}", lambda pol=pol: res["compression"].append(
            bench_compression(max(args.contexts), max(32, round(args.retention * max(args.contexts))), pol)))
    if res["points"]:
        section("plot", lambda: plot(res["points"], out.with_suffix(".png")))
    res["variant_point"] = (max(args.batches), max(args.contexts))
    section("variants", lambda: res.__setitem__(
        "variants", bench_variants(max(args.batches), max(args.contexts), args.retention, gen, args.iters)))
    print(report(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
