"""One decode step's attention, all layers, through SGLang's FlashInfer backend: full KV vs headkv.

Runs on a CUDA machine with SGLang's Python layer and FlashInfer importable (the device
bundle of ``scripts/gpu_check.sh``). Llama-3-8B-shaped attention (32 layers, 32 query / 8
KV heads, head_dim 128, bf16), ``--batch`` requests of ``--context`` prompt tokens plus
``--tail`` decoded tokens:

* **full**: SGLang's ``FlashInferAttnBackend`` as SGLang decodes (plan once per step, then
  one ``forward_decode`` per layer) over the whole context. To fit the GPU, every layer
  reads layer 0's KV buffer (32 x 32k x 32 layers would be 128 GiB; each layer's call
  reads the same number of bytes either way).
* **headkv**: :class:`~headkv_sglang.serving.backend.HeadKVAttnBackend` wrapping the same
  SGLang backend, every request compressed to ``--budget`` tokens per KV head on average
  (skewed over heads, log-normal like HeadKV's budgets), glue included: the wrapper's
  ``init_forward_metadata`` (stand-in batch, SGLang's plan, tail tables, the ragged plan)
  and per layer SGLang's decode over 1-token stand-in rows + the FlashInfer ragged kernel
  (prompt pages ⊕ tail) + merge + scatter.

Eager (no CUDA graphs on either side: batches with compressed rows run eagerly in the
server). Times from CUDA events, median of ``--steps`` steps after warm-up.

    python benchmarks/gpu_decode_step.py --out OUTDIR/decode_step_h200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_runner(kit, batch, num_heads, num_kv_heads, head_dim, max_ctx, backend, device, dtype):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    case = kit.DenseAttentionCase(name="bench", backend=backend, forward_mode=ForwardMode.DECODE,
                                  num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=1,
                                  prefix_lens=(max_ctx - 1,) * batch)
    cfg = kit.TinyModelConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              hidden_size=num_heads * head_dim, context_len=max_ctx, sliding_window_size=None)
    return kit.MockModelRunner(case=case, model_config=cfg, dtype=dtype, device=device,
                               max_context_len=max_ctx, head_dim=head_dim)


def decode_batch(runner, seq_lens: list[int], out_cache_loc: torch.Tensor, device):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    B = len(seq_lens)
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=B,
        input_ids=torch.zeros(B, dtype=torch.int64, device=device),
        req_pool_indices=torch.arange(B, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
        out_cache_loc=out_cache_loc, seq_lens_sum=sum(seq_lens),
        positions=torch.tensor([s - 1 for s in seq_lens], dtype=torch.int64, device=device))
    runner.kv_index_translator.bind_own_plan(fb)
    return fb


def time_steps(step, steps: int, cuda: bool) -> list[float]:
    """Milliseconds per call of ``step``: CUDA events on a GPU, wall clock elsewhere."""
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t))
    return times


def skewed_lengths(gen, rows: int, heads: int, budget: int, context: int) -> torch.Tensor:
    """Per-(row, head) kept tokens: log-normal over heads, mean ``budget``, in [1, context]."""
    w = torch.exp(torch.randn(rows, heads, generator=gen) * 1.0)
    lengths = (w / w.mean(dim=1, keepdim=True) * budget).round().clamp(1, context).to(torch.int64)
    return lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--tail", type=int, default=256)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run N headkv steps under torch.profiler, the wrapper's parts labelled; "
                        "tables of host and device time by part and by op in OUT.profile.txt")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny run on the CPU through torch_native + the torch kernel (checks the script, times nothing)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

    from headkv_sglang.config import ModelShape
    from headkv_sglang.kv.manager import CompressionManager
    from headkv_sglang.kv.pool import LayerPages, RequestPages
    from headkv_sglang.serving.backend import HeadKVAttnBackend, make_kernel

    Hq, H, D, L, B = 32, 8, 128, a.layers, a.batch
    cuda = not a.cpu_dry_run
    dev, backend_name, dtype = ("cuda", "flashinfer", torch.bfloat16) if cuda else ("cpu", "torch_native", torch.float32)
    seq = a.context + a.tail
    max_ctx = seq + 1
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(0)
    result: dict = {"batch": B, "context": a.context, "tail": a.tail, "budget": a.budget, "layers": L,
                    "heads": [Hq, H, D], "page_size": a.page_size}

    # ---- full KV: SGLang's FlashInfer backend over the whole context
    runner = make_runner(kit, B, Hq, H, D, max_ctx, backend_name, dev, dtype)
    kv = runner.token_to_kv_pool
    slot = (torch.arange(B, device=dev)[:, None] * max_ctx + torch.arange(max_ctx, device=dev)[None, :] + 1)
    runner.req_to_token_pool.req_to_token[:B, :max_ctx] = slot.to(torch.int32)
    kv.get_key_buffer(0).normal_()
    kv.get_value_buffer(0).normal_()
    full = ATTENTION_BACKENDS[backend_name](runner)
    out_loc = slot[:, seq - 1].to(torch.int64)
    fb = decode_batch(runner, [seq] * B, out_loc, dev)
    layer0 = RadixAttention(num_heads=Hq, head_dim=D, scaling=scale, num_kv_heads=H, layer_id=0)
    q = torch.randn(B, Hq * D, device=dev).to(dtype)
    k = torch.randn(B, H, D, device=dev).to(dtype)

    def full_step():
        full.init_forward_metadata(fb)
        for _ in range(L):
            full.forward_decode(q, k, k, layer0, fb)

    with forward_context(ForwardContext(attn_backend=full)):
        t_full = time_steps(full_step, a.steps, cuda)
    full_bytes = 2 * B * seq * H * D * 2 * L
    result["full"] = {"step_ms": statistics.median(t_full), "kv_bytes": full_bytes}
    print(f"full KV: {statistics.median(t_full):.2f} ms per step ({full_bytes / 2**30:.1f} GiB of KV read)",
          flush=True)
    del full, fb, kv
    runner.token_to_kv_pool = None
    if cuda:
        torch.cuda.empty_cache()

    # ---- headkv: the wrapper around the same SGLang backend, prompts in the ragged pool
    tail_slots = B * (a.tail + 1) + 2
    kv = MHATokenToKVPool(size=tail_slots, page_size=1, dtype=dtype, head_num=H, head_dim=D,
                          layer_num=L, device=dev, enable_memory_saver=False, enable_alt_stream=False)
    for layer in range(L):
        kv.get_key_buffer(layer).normal_()
        kv.get_value_buffer(layer).normal_()
    runner.token_to_kv_pool = kv
    runner.token_to_kv_pool_allocator.get_kvcache = lambda: kv
    # prompt positions point at slot 1 (released: never read but by the 1-token stand-in);
    # each request's tail has its own slots
    r2t = runner.req_to_token_pool.req_to_token
    r2t[:B, :max_ctx] = 1
    tails = 2 + torch.arange(B * a.tail, device=dev).view(B, a.tail)
    r2t[:B, a.context:seq] = tails.to(torch.int32)
    inner = ATTENTION_BACKENDS[backend_name](runner)
    shape = ModelShape(num_layers=L, num_q_heads=Hq, num_kv_heads=H, head_dim=D)
    lengths = skewed_lengths(gen, B * L, H, a.budget, a.context)
    pages_needed = int(((lengths + a.page_size - 1) // a.page_size).sum())
    manager = CompressionManager(shape, pages_needed + 1, a.page_size, dtype, dev)
    manager.pool.k_pages.normal_()
    manager.pool.v_pages.normal_()
    cursor = 0
    for r in range(B):
        rec = RequestPages(prompt_len=a.context, policy="headkv", budget=a.budget)
        for layer in range(L):
            ln = lengths[r * L + layer]
            pages = (ln + a.page_size - 1) // a.page_size
            indptr = torch.zeros(H + 1, dtype=torch.int64)
            torch.cumsum(pages, 0, out=indptr[1:])
            ids = torch.arange(cursor, cursor + int(pages.sum()), dtype=torch.int64)
            cursor += int(pages.sum())
            lp = LayerPages(kv_indptr=indptr, kv_indices=ids, lengths=ln)
            lp._page_size = a.page_size
            rec.layers.append(lp)
            rec.kept_tokens += int(ln.sum())
        manager.install_record(r, rec)
    kernel_name, kernel = make_kernel(manager.pool, shape, torch.device(dev), scale)
    wrapper = HeadKVAttnBackend(inner, manager, kernel, runner.req_to_token_pool, kv)
    layers = [RadixAttention(num_heads=Hq, head_dim=D, scaling=scale, num_kv_heads=H, layer_id=i) for i in range(L)]
    fb = decode_batch(runner, [seq] * B, tails[:, -1].to(torch.int64), dev)

    def headkv_step():
        wrapper.init_forward_metadata(fb)
        for layer in layers:
            wrapper.forward_decode(q, k, k, layer, fb)

    with forward_context(ForwardContext(attn_backend=wrapper)):
        t0 = time.perf_counter()
        headkv_step()  # first step of this batch: the ragged plan of every layer
        if cuda:
            torch.cuda.synchronize()
        first = 1000 * (time.perf_counter() - t0)
        t_h = time_steps(headkv_step, a.steps, cuda)
        # what a new batch's plan costs, split: our host tables vs the whole plan (FlashInfer's included)
        kern, rows = wrapper.kernel, wrapper.kernel.rows
        from flashinfer_ext.plan import build_decode_plan

        def tables():
            for layer in range(L):
                build_decode_plan([rec.layers[layer] for rec in rows.records], a.page_size)

        def replan():
            kern._prompt_key = None
            kern.plan(rows)

        extra = {"replan_ms": statistics.median(time_steps(replan, 3, False)),
                 "host_tables_ms": statistics.median(time_steps(tables, 3, False))}
        # the ragged kernel alone for all layers: eager vs one CUDA-graph replay
        extra.update(graphed_kernel(kern, rows, manager, shape, kv, q.view(B, Hq, D), L, B, a, scale, cuda))
        if a.profile:
            profile_steps(wrapper, headkv_step, a.profile, cuda, Path(a.out).with_suffix(".profile.txt"))
    print(f"new batch: plan {extra['replan_ms']:.1f} ms, of which host tables {extra['host_tables_ms']:.1f} ms",
          flush=True)
    if "graph_ms" in extra:
        print(f"ragged kernel alone, {L} layers: eager {extra['kernel_eager_ms']:.2f} ms, "
              f"CUDA graph {extra['graph_ms']:.2f} ms", flush=True)
    kept = sum(rec.kept_tokens for rec in manager.records.values())
    held = pages_needed * manager.pool.bytes_per_page + 2 * B * a.tail * H * D * 2 * L
    result["headkv"] = {"step_ms": statistics.median(t_h), "first_step_ms_with_ragged_plan": first,
                        "kept_fraction": kept / (B * a.context * L * H), "kv_bytes_held": held, **extra}
    result["speedup"] = result["full"]["step_ms"] / result["headkv"]["step_ms"]
    result["kernel"] = kernel_name
    result["machine"] = {"gpu": torch.cuda.get_device_name() if cuda else "CPU dry run", "torch": torch.__version__,
                         "python": platform.python_version(), "flashinfer": _version("flashinfer")}
    print(f"headkv: {statistics.median(t_h):.2f} ms per step (first step of the batch {first:.1f} ms incl. the "
          f"ragged plan of {L} layers); {100 * result['headkv']['kept_fraction']:.2f}% of the prompt KV kept; "
          f"speedup {result['speedup']:.1f}x", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    cmd = "python benchmarks/gpu_decode_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.with_suffix(".md").write_text(
        f"# One decode step's attention, all layers, through SGLang's FlashInfer backend\n\n"
        f"Machine: {result['machine']['gpu']}, torch {torch.__version__}, flashinfer "
        f"{result['machine']['flashinfer']}, Python {platform.python_version()}.\n"
        f"Command: `{cmd}` (via `scripts/gpu_check.sh`).\n\n"
        f"{B} requests x {a.context}-token prompts + {a.tail} decoded tokens, {L} layers of 32 query / 8 KV heads, "
        f"head_dim 128, bf16, eager, median of {a.steps} steps.\n\n"
        f"| | per step (ms) | KV held (GiB) |\n|---|---|---|\n"
        f"| full KV (SGLang FlashInfer backend) | {result['full']['step_ms']:.2f} | {full_bytes / 2**30:.2f} |\n"
        f"| headkv budget {a.budget} (wrapper + FlashInfer ragged kernel, glue included) | "
        f"{result['headkv']['step_ms']:.2f} | {held / 2**30:.2f} |\n\n"
        f"Speedup **{result['speedup']:.1f}x**; {100 * result['headkv']['kept_fraction']:.2f}% of the prompt KV "
        f"kept (skewed over heads). First headkv step of a new batch (plans every layer's ragged rows): "
        f"{first:.1f} ms; a re-plan of the same batch {result['headkv']['replan_ms']:.1f} ms, of which "
        f"{result['headkv']['host_tables_ms']:.1f} ms build our tables (the rest is FlashInfer's plan and copies). "
        f"Full KV reads layer 0's buffer for every layer (the whole cache would be "
        f"{full_bytes / 2**30:.0f} GiB).\n" + graph_note(result["headkv"], L))
    return 0


def graphed_kernel(kern, rows, manager, shape, kv, q, L, B, a, scale, cuda) -> dict:
    """The FlashInfer ragged kernel alone for all layers: eager runs vs one CUDA-graph replay of
    the same batch (``cuda_graph=True`` kernel, fixed buffers, planned outside the graph)."""
    if not cuda:
        return {}
    from flashinfer_ext.ragged import FlashInferRaggedAttention

    max_pages = max(sum(rec.layers[l].kv_indices.numel() for rec in rows.records) for l in range(L))
    g = FlashInferRaggedAttention(manager.pool, L, shape.num_kv_heads, shape.num_q_heads, scale, cuda_graph=True,
                                  max_rows=B, max_pages=max_pages, max_tail=rows.tail_slots.numel())
    g.plan(rows)
    bufs = [(kv.get_key_buffer(l), kv.get_value_buffer(l)) for l in range(L)]

    def eager():
        for l in range(L):
            kern.run(l, q, *bufs[l], scale)

    def run_all():
        return [g.run(l, q, *bufs[l], scale) for l in range(L)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run_all()
    graph.replay()
    want = [kern.run(l, q, *bufs[l], scale) for l in range(L)]
    err = max(float((o.float() - w.float()).abs().max()) for o, w in zip(outs, want))
    return {"kernel_eager_ms": statistics.median(time_steps(eager, a.steps, True)),
            "graph_ms": statistics.median(time_steps(graph.replay, a.steps, True)),
            "graph_max_abs_diff_vs_eager": err}


def profile_steps(wrapper, step, n: int, cuda: bool, path: Path) -> None:
    """``n`` calls of ``step`` under torch.profiler, the wrapper's parts labelled (SGLang's plan
    and decode, our plan, the ragged kernel, the step): where a step's host and device time go."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name, fn):
        def call(*args, **kw):
            with record_function(name):
                return fn(*args, **kw)
        return call

    patched = [(wrapper.inner, "init_forward_metadata"), (wrapper.inner, "forward_decode"),
               (wrapper, "_plan"), (wrapper.kernel, "run")]
    for obj, name in patched:
        setattr(obj, name, labelled(f"## {type(obj).__name__}.{name}", getattr(obj, name)))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            with record_function("## step"):
                step()
        if cuda:
            torch.cuda.synchronize()
    for obj, name in patched:
        delattr(obj, name)  # the class's method again
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    ka = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{n} steps; labelled parts (## ...) and ops, by host (CPU) time, then by {sort}\n\n"
                    + ka.table(sort_by="cpu_time_total", row_limit=30) + "\n\n"
                    + ka.table(sort_by=sort, row_limit=30) + "\n")
    print(f"profile: {path}", flush=True)


def graph_note(h: dict, L: int) -> str:
    if "graph_ms" not in h:
        return ""
    return (f"\nThe FlashInfer ragged kernel alone (prompt pages + tail + merge, {L} layers): eager "
            f"{h['kernel_eager_ms']:.2f} ms, one CUDA-graph replay {h['graph_ms']:.2f} ms (max |diff| vs eager "
            f"{h['graph_max_abs_diff_vs_eager']:.1e}). The server does not replay graphs for batches with "
            f"compressed rows yet: those run eagerly.\n")


def _version(pkg: str) -> str:
    try:
        return __import__(pkg).__version__
    except Exception:  # the device bundle may ship no metadata
        return "unknown"


if __name__ == "__main__":
    os.environ.setdefault("SGLANG_FLASHINFER_USE_TENSOR_CORE", "false")
    sys.exit(main())
