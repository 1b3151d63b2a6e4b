"""One decode step's attention of compressed rows, all layers, on the CPU: per-row loop vs batched kernel.

The test model's attention shape (SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head_dim
64, float32 as the CPU server runs it), ``--concurrency`` compressed requests decoding
together, each with a ``--prompt-len``-token prompt compressed to ``--budget`` tokens per
KV head on average and a tail of ``--tail`` decoded tokens in a random SGLang-style token
pool. Two implementations of the same attention, timed side by side in one run:

* **per-row loop (before)**: the serving path until the batched kernel replaced it: for
  every compressed row and every layer, gather the row's tail from the token pool and call
  ``CompressionManager.attend`` (copied below from ``git show 9bd95a2:headkv_sglang/compression.py``,
  with the per-row glue of ``9bd95a2:headkv_sglang/sglang_backend.py``).
* **batched torch kernel (now)**: :class:`~headkv_sglang.kv.ragged.TorchRaggedAttention`,
  as the serving backend drives it: ``rows_for_queries`` + ``plan`` once per step (a re-plan
  with the same records: the steady decode step), ``run`` once per layer.

Both write one ``[R, Hq, D]`` output per layer; they must agree (max abs diff < 1e-4).
The two are interleaved (a b a b ...) over ``--repeats`` steps after one warm-up each;
medians reported. The plan is also timed on its own: the first plan of a batch (new
records: every layer's prompt tables) vs a re-plan with the same records.

Page contents are random (no model runs); page tables are built directly, like
``tests/ragged_oracle.random_request``. Kept tokens per (layer, KV head) follow one
log-normal profile over all the request's heads (HeadKV splits one shared budget across
every head of every layer by an offline importance profile, so all requests of the same
prompt length share it), mean ``--budget``, clamped to ``[1, prompt_len]``.

    python benchmarks/cpu_decode.py --out benchmarks/results/cpu_decode_kernel
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headkv_sglang.kv.pool import LayerPages, RaggedHeadKVPool, RequestPages  # noqa: E402
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries  # noqa: E402


# ---------------------------------------------------------------------------- (a) before
def old_attend(pool: RaggedHeadKVPool, rec: RequestPages, layer: int, q: torch.Tensor, k_tail: torch.Tensor,
               v_tail: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Copied from ``CompressionManager.attend`` (``git show 9bd95a2:headkv_sglang/compression.py``),
    only ``self.records[req_pool_idx]`` / ``self.shape`` / ``self.pool`` turned into arguments.

    Attention of ``q`` ``[n, Hq, D]`` over the compressed prompt and the tail.
    ``k_tail``/``v_tail``: ``[m, H, D]`` positions ``prompt_len .. prompt_len+m-1``;
    ``q_pos``: int64 ``[n]`` absolute positions of the queries (a query sees tail
    positions ``<= q_pos``). Returns ``[n, Hq, D]`` in ``q``'s dtype.
    """
    lp = rec.layers[layer]
    H, D = lp.lengths.numel(), pool.head_dim
    n, Hq, _ = q.shape
    G = Hq // H
    qf = q.float().view(n, H, G, D)
    kp, vp, mask = pool.gather_padded(lp)  # [H, Lp, D], [H, Lp]
    logits_p = torch.einsum("nhgd,hld->nhgl", qf, kp.float()) * scale
    logits_p = logits_p.masked_fill(~mask[None, :, None, :], float("-inf"))
    parts_l = [logits_p]
    parts_v = [vp.float()[None].expand(n, -1, -1, -1)]  # [n, H, Lp, D]
    if lp.comp_count is not None:
        cnt = lp.comp_count.to(q.device)
        bias = torch.where(cnt > 0, torch.log(cnt.clamp(min=1).float()),
                           torch.full_like(cnt, float("-inf"), dtype=torch.float32))
        logit_c = torch.einsum("nhgd,hd->nhg", qf, lp.comp_k.float()) * scale + bias[None, :, None]
        parts_l.append(logit_c[..., None])
        parts_v.append(lp.comp_v.float()[None, :, None, :].expand(n, -1, -1, -1))
    m = k_tail.shape[0]
    if m:
        logits_t = torch.einsum("nhgd,mhd->nhgm", qf, k_tail.float()) * scale
        tail_pos = rec.prompt_len + torch.arange(m, device=q.device)
        visible = tail_pos[None, :] <= q_pos.to(q.device)[:, None]  # [n, m]
        logits_t = logits_t.masked_fill(~visible[:, None, None, :], float("-inf"))
        parts_l.append(logits_t)
        parts_v.append(v_tail.float().permute(1, 0, 2)[None].expand(n, -1, -1, -1))
    logits = torch.cat(parts_l, dim=-1)  # [n, H, G, Ltot]
    vals = torch.cat(parts_v, dim=2)  # [n, H, Ltot, D]
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("nhgl,nhld->nhgd", probs, vals)
    return out.reshape(n, Hq, D).to(q.dtype)


def old_decode_layer(pool, records, req_to_token, req_pool_indices, seq_lens, layer, q, k_buffer, v_buffer,
                     scale, o):
    """One layer of the old decode path for the compressed rows: the loop of
    ``HeadKVTorchNativeBackend.forward_decode`` + ``_attend_compressed``
    (``git show 9bd95a2:headkv_sglang/sglang_backend.py``), every row compressed."""
    for i in range(q.shape[0]):
        idx = int(req_pool_indices[i])
        rec = records[idx]
        seq_len = int(seq_lens[i])
        slots = req_to_token[idx, rec.prompt_len:seq_len]
        k_tail = k_buffer[slots]
        v_tail = v_buffer[slots]
        prefix_len = seq_len - 1
        q_pos = torch.arange(prefix_len, prefix_len + 1)
        o[i:i + 1] = old_attend(pool, rec, layer, q[i:i + 1], k_tail, v_tail, q_pos, scale)
    return o


# ---------------------------------------------------------------------------- setup
def headkv_profile(gen, layers: int, heads: int, budget: int, prompt_len: int, sigma: float) -> torch.Tensor:
    """int64 ``[layers, heads]`` kept tokens: log-normal over all heads, mean ``budget``, in [1, prompt_len]."""
    w = torch.exp(torch.randn(layers, heads, generator=gen) * sigma)
    return (w / w.mean() * budget).round().clamp(1, prompt_len).to(torch.int64)


def build(a, C: int, L: int, H: int, D: int, dtype, gen):
    ps = a.page_size
    lengths = headkv_profile(gen, L, H, a.budget, a.prompt_len, a.sigma)
    pages_per_req = int(((lengths + ps - 1) // ps).sum())
    pool = RaggedHeadKVPool(C * pages_per_req + 1, ps, D, dtype, "cpu")
    pool.k_pages.normal_(generator=gen)
    pool.v_pages.normal_(generator=gen)
    free = torch.randperm(pool.num_pages, generator=gen).tolist()  # pages scattered over the pool
    # SGLang-style token pool: slot 0 is padding, every request's tail in random slots
    seq = a.prompt_len + a.tail
    max_reqs, max_ctx = 2 * C, seq + 8
    slots = 2 * C * a.tail + 1
    k_buffers = [torch.randn(slots, H, D, generator=gen).to(dtype) for _ in range(L)]
    v_buffers = [torch.randn(slots, H, D, generator=gen).to(dtype) for _ in range(L)]
    req_to_token = torch.zeros(max_reqs, max_ctx, dtype=torch.int32)  # compressed prompt slots: freed (0)
    req_pool_indices = torch.randperm(max_reqs, generator=gen)[:C].tolist()
    tail_slots = 1 + torch.randperm(slots - 1, generator=gen)[:C * a.tail].view(C, a.tail)
    records: dict[int, RequestPages] = {}
    for r, idx in enumerate(req_pool_indices):
        req_to_token[idx, a.prompt_len:seq] = tail_slots[r].to(torch.int32)
        rec = RequestPages(prompt_len=a.prompt_len, policy="headkv", budget=a.budget)
        for layer in range(L):
            ln = lengths[layer].clone()
            pages = (ln + ps - 1) // ps
            indptr = torch.zeros(H + 1, dtype=torch.int64)
            torch.cumsum(pages, 0, out=indptr[1:])
            ids = [free.pop() for _ in range(int(pages.sum()))]
            rec.page_ids += ids
            lp = LayerPages(kv_indptr=indptr, kv_indices=torch.tensor(ids, dtype=torch.int64), lengths=ln)
            if a.compensation:  # RazorAttention-style compensation states
                lp.comp_k = torch.randn(H, D, generator=gen).to(dtype)
                lp.comp_v = torch.randn(H, D, generator=gen).to(dtype)
                lp.comp_count = torch.randint(1, a.prompt_len, (H,), generator=gen)
            lp._page_size = ps
            rec.layers.append(lp)
            rec.kept_tokens += int(ln.sum())
        records[idx] = rec
    return pool, records, req_to_token, req_pool_indices, k_buffers, v_buffers, lengths


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def ms(f) -> float:
    t = time.perf_counter()
    f()
    return 1000 * (time.perf_counter() - t)


def bench(a, C: int) -> dict:
    L, Hq, H, D, dtype = 30, 9, 3, 64, torch.float32
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(1234 + C)
    pool, records, req_to_token, idxs, kbs, vbs, lengths = build(a, C, L, H, D, dtype, gen)
    seq = a.prompt_len + a.tail
    qs = [torch.randn(C, Hq, D, generator=gen).to(dtype) for _ in range(L)]
    seq_lens = torch.tensor([seq] * C, dtype=torch.int64)
    req_pool_indices = torch.tensor(idxs, dtype=torch.int64)
    o_old = [torch.empty(C, Hq, D, dtype=dtype) for _ in range(L)]
    o_new = [torch.empty(C, Hq, D, dtype=dtype) for _ in range(L)]
    q_index = torch.arange(C)

    def step_old():
        for layer in range(L):
            old_decode_layer(pool, records, req_to_token, req_pool_indices, seq_lens, layer, qs[layer],
                             kbs[layer], vbs[layer], scale, o_old[layer])

    def make_rows():
        # as HeadKVAttnBackend.init_forward_metadata builds them for a decode batch
        recs = [records[i] for i in idxs]
        sl = seq_lens.tolist()
        return rows_for_queries(recs, req_to_token, idxs, [r.prompt_len for r in recs], sl)

    kernel = TorchRaggedAttention(pool, L, H)
    kernel.plan(make_rows())

    def step_new():
        kernel.plan(make_rows())  # same records: the prompt tables are kept
        for layer in range(L):
            out = kernel.run(layer, qs[layer], kbs[layer], vbs[layer], scale)
            o_new[layer].index_copy_(0, q_index, out)

    def first_plan():
        TorchRaggedAttention(pool, L, H).plan(make_rows())

    def replan():
        kernel.plan(make_rows())

    # warm-up, and the agreement check (equal work)
    step_old()
    step_new()
    diff = max(float((x - y).abs().max()) for x, y in zip(o_old, o_new))
    print(f"  concurrency {C}: max abs diff per-row loop vs batched = {diff:.2e}", flush=True)
    assert diff < 1e-4, f"the two implementations disagree: max abs diff {diff}"
    t_old, t_new, t_first, t_re = [], [], [], []
    for _ in range(a.repeats):  # interleaved
        t_old.append(ms(step_old))
        t_new.append(ms(step_new))
        t_first.append(ms(first_plan))
        t_re.append(ms(replan))
    res = {
        "concurrency": C,
        "per_row_loop_ms": statistics.median(t_old),
        "batched_ms": statistics.median(t_new),
        "speedup": statistics.median(t_old) / statistics.median(t_new),
        "first_plan_ms": statistics.median(t_first),
        "replan_ms": statistics.median(t_re),
        "max_abs_diff": diff,
        "samples_ms": {"per_row_loop": t_old, "batched": t_new, "first_plan": t_first, "replan": t_re},
        "kept_per_head": {"mean": float(lengths.float().mean()), "min": int(lengths.min()),
                          "max": int(lengths.max())},
        "padded_prompt_tokens_per_layer_row": float(
            statistics.mean(int(lengths[layer].max()) for layer in range(L))),
    }
    print(f"  concurrency {C}: per-row loop {res['per_row_loop_ms']:.1f} ms/step, batched {res['batched_ms']:.1f} "
          f"ms/step ({res['speedup']:.2f}x); plan: first {res['first_plan_ms']:.1f} ms, re-plan "
          f"{res['replan_ms']:.2f} ms", flush=True)
    return res


def write_md(doc: dict, out: Path) -> None:
    """The markdown report of a run's json (``doc``)."""
    mach, st, results = doc["machine"], doc["setup"], doc["results"]
    load = mach.get("loadavg_1min_before_after")
    lines = [
        "# One decode step's compressed-row attention on the CPU: per-row loop (before) vs batched kernel (now)",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), shared; torch {mach['torch']} at its default "
        f"{mach['torch_threads']} threads; Python {mach['python']}."
        + (f" 1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end." if load else ""),
        f"Command: `source scripts/env.sh && {doc['command']}`",
        "",
        f"SmolLM2-135M attention shape (30 layers, 9 query / 3 KV heads, head_dim 64, float32), every request "
        f"compressed: {st['prompt_len']}-token prompts kept at {st['budget']} tokens per KV head on average "
        f"(one log-normal profile over all 90 heads, sigma {st['sigma']}, as HeadKV's shared budget; kept per head "
        f"{results[0]['kept_per_head']['min']}..{results[0]['kept_per_head']['max']}), pages of {st['page_size']}, "
        f"+ {st['tail']} decoded tokens in random token-pool slots"
        f"{', + a Razor compensation state per head' if st['compensation'] else ', no compensation'}. "
        f"One step = all 30 layers' attention for every row. Median of {st['repeats']} interleaved steps after a "
        f"warm-up; both variants produce the same outputs (max abs diff in the table).",
        "",
        "| concurrency | per-row loop (before) ms/step | batched kernel (now) ms/step | speedup | "
        "first plan ms | re-plan ms | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['per_row_loop_ms']:.1f} | {r['batched_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['first_plan_ms']:.1f} | {r['replan_ms']:.2f} | "
                     f"{r['max_abs_diff']:.1e} |")
    lines += [
        "",
        "*per-row loop*: for each row and layer, the row's tail gathered from the token pool and the old "
        "`CompressionManager.attend` (copied into the benchmark from commit 9bd95a2, using `pool.gather_padded`). "
        "*batched kernel*: `rows_for_queries` + `TorchRaggedAttention.plan` (a re-plan with the same records, "
        "as in every steady decode step; included in its ms/step) + one `run` per layer. *first plan*: the plan "
        "of a batch with new records (every layer's prompt tables, paid once when the batch's compressed "
        "requests change); *re-plan*: the same records (tail tables only). Both plan columns include "
        "`rows_for_queries`.",
        "",
        "Spread of the samples (ms, min..max, in run order in the json):",
        "",
    ]
    for r in results:
        sm = r["samples_ms"]
        lines.append(f"* concurrency {r['concurrency']}: per-row loop {min(sm['per_row_loop']):.0f}.."
                     f"{max(sm['per_row_loop']):.0f}, batched {min(sm['batched']):.0f}..{max(sm['batched']):.0f}, "
                     f"first plan {min(sm['first_plan']):.0f}..{max(sm['first_plan']):.0f}, re-plan "
                     f"{min(sm['replan']):.1f}..{max(sm['replan']):.1f}")
    slower = [r["concurrency"] for r in results if r["speedup"] < 1]
    lines.append("")
    if slower:
        lines.append(f"**The batched kernel is slower than the per-row loop at concurrency "
                     f"{', '.join(map(str, slower))}.**")
    else:
        lines.append("The batched kernel is faster at every concurrency measured (ratio of medians).")
    if doc.get("notes"):
        lines += ["", doc["notes"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--budget", type=int, default=128, help="mean kept tokens per (layer, KV head)")
    p.add_argument("--tail", type=int, default=32, help="decoded tokens in the token pool")
    p.add_argument("--page-size", type=int, default=16, help="compressed pool page size (the server's default)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the per-head budget skew")
    p.add_argument("--compensation", action="store_true", help="give every row a Razor compensation state")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.report_only:
        write_md(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    torch.set_grad_enabled(False)
    load0 = os.getloadavg()[0]
    mach = machine()
    print(f"machine: {mach['nproc']} CPUs ({mach['cpu']}), torch {mach['torch']} with {mach['torch_threads']} "
          f"threads, Python {mach['python']}, load average {load0:.2f}", flush=True)
    results = [bench(a, C) for C in a.concurrency]
    mach["loadavg_1min_before_after"] = [load0, os.getloadavg()[0]]
    cmd = "python benchmarks/cpu_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": cmd, "machine": mach,
           "setup": {"model_shape": "SmolLM2-135M", "layers": 30, "q_heads": 9, "kv_heads": 3, "head_dim": 64,
                     "dtype": "float32", "prompt_len": a.prompt_len, "budget": a.budget, "tail": a.tail,
                     "page_size": a.page_size, "sigma": a.sigma, "compensation": a.compensation,
                     "repeats": a.repeats},
           "results": results}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    write_md(doc, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
