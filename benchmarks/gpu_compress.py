"""Compression's share of time-to-first-token on a GPU: one prompt's prefill vs compressing it.

Llama-3-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096, MLP 14336,
bf16), one request of ``--contexts`` prompt tokens:

* **prefill**: the model's forward over the prompt, every layer = QKV projection, causal
  GQA attention (torch SDPA, flash), output projection and the SwiGLU MLP, one layer's
  random weights reused for all 32 (no embedding, norms, RoPE or LM head). A lower bound
  of a real prefill, so the share below is an upper bound.
* **compress**: :meth:`headkv_sglang.kv.manager.CompressionManager.compress` of the same
  prompt, all 32 layers, as the server calls it once the prompt is complete: scoring
  from the captured queries, budgets, the keep mask (batched over heads), the gather and
  the write into the ragged pool, for each policy at ``--budget`` tokens per KV head.
  HeadKV uses a synthetic log-normal head profile of this shape (timing does not depend
  on the profile's values).

Share of TTFT = compress / (prefill + compress). Times from CUDA events, median of
``--repeats`` after a warm-up; pages are freed between repeats.

    python benchmarks/gpu_compress.py --out OUTDIR/compress_h200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ["snapkv", "adakv", "pyramidkv", "headkv", "headkv+question"]


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def synthetic_profile(L: int, Hq: int, H: int, D: int, path: Path) -> str:
    from headkv_sglang.profiles import HeadProfile

    gen = torch.Generator().manual_seed(0)
    scores = torch.exp(torch.randn(L, Hq, generator=gen)).tolist()
    HeadProfile(architecture="LlamaForCausalLM", model_name="synthetic (benchmarks/gpu_compress.py)",
                num_layers=L, num_q_heads=Hq, num_kv_heads=H, head_dim=D, method="r2",
                parameters={"synthetic": True}, scores=scores).save(path, heatmap=False)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--budget", type=int, default=1024, help="prompt tokens kept per KV head")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny shapes on the CPU (checks the script; its times mean nothing)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from headkv_sglang.config import KVPolicyConfig, ModelShape
    from headkv_sglang.kv.manager import CompressionManager

    cuda = not a.cpu_dry_run
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device (use --cpu-dry-run to check the script on a CPU)")
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    L, Hq, H, D, hidden, inter = (32, 32, 8, 128, 4096, 14336) if cuda else (2, 4, 2, 16, 64, 128)
    contexts = a.contexts if cuda else [300, 700]
    budget = a.budget if cuda else 24
    page_size = 16
    shape = ModelShape(num_layers=L, num_q_heads=Hq, num_kv_heads=H, head_dim=D)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, device=dev) * scale).to(dtype)

    w_qkv = rand(hidden, (Hq + 2 * H) * D, scale=hidden ** -0.5)
    w_o = rand(Hq * D, hidden, scale=(Hq * D) ** -0.5)
    w_gu = rand(hidden, 2 * inter, scale=hidden ** -0.5)
    w_down = rand(inter, hidden, scale=inter ** -0.5)
    tmp = Path(tempfile.mkdtemp())
    profile = synthetic_profile(L, Hq, H, D, tmp / "r2.json")
    rows = []
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # on a GPU the flash kernel or an error, never a silent fallback to the math kernel
    backends = [SDPBackend.FLASH_ATTENTION] if cuda else [SDPBackend.MATH]
    for T in contexts:
        x0 = rand(T, hidden)

        def prefill():
            x = x0
            for _ in range(L):
                qkv = x @ w_qkv
                q = qkv[:, :Hq * D].view(T, Hq, D).transpose(0, 1)
                k = qkv[:, Hq * D:(Hq + H) * D].view(T, H, D).transpose(0, 1)
                v = qkv[:, (Hq + H) * D:].view(T, H, D).transpose(0, 1)
                # K/V expanded to the query heads: SDPA's GQA path (enable_gqa) falls back to
                # the math kernel, which materialises T x T scores (128 GiB at 32k)
                k, v = k.repeat_interleave(Hq // H, 0), v.repeat_interleave(Hq // H, 0)
                with sdpa_kernel(backends):
                    o = torch.nn.functional.scaled_dot_product_attention(  # fused kernels: 4-D only
                        q[None], k[None], v[None], is_causal=True)[0]
                x = x + o.transpose(0, 1).reshape(T, Hq * D) @ w_o
                g, u = (x @ w_gu).chunk(2, dim=-1)
                x = x + (torch.nn.functional.silu(g) * u) @ w_down
            return x

        t_prefill = timed(prefill, a.repeats, cuda)
        print(f"T={T}: prefill forward {t_prefill:.1f} ms", flush=True)
        ks = [rand(T, H, D) for _ in range(L)]
        vs = [rand(T, H, D) for _ in range(L)]
        qs = [rand(64, Hq, D) for _ in range(L)]  # the last 64 prompt queries per layer
        pages = L * H * ((min(budget, T) + page_size - 1) // page_size + 2) * 4 + 64
        mgr = CompressionManager(shape, pages, page_size, dtype, dev)
        for name in a.policies:
            pol, question = name.split("+")[0], name.endswith("+question")
            cfg = KVPolicyConfig(policy=pol, budget=budget, head_profile=profile if pol == "headkv" else None)

            def compress():
                span = (T - 22, T - 6) if question else None
                mgr.begin_extend(0, "bench", window=cfg.obs_window, span=span)
                for layer in range(L):
                    mgr.capture_queries(layer, 0, qs[layer][-(cfg.obs_window if span is None else 64):],
                                        pos=T - 64 if span is not None else None)
                mgr.compress(0, cfg, T, lambda layer: (ks[layer], vs[layer]))
                mgr.free(0)

            t = timed(compress, a.repeats, cuda)
            share = t / (t_prefill + t)
            rows.append({"context": T, "policy": name, "prefill_ms": t_prefill, "compress_ms": t,
                         "ttft_share": share})
            print(f"T={T} {name}: compress {t:.1f} ms = {100 * share:.1f}% of TTFT", flush=True)
        mgr.check_integrity()
        del ks, vs, qs, mgr
        if cuda:
            torch.cuda.empty_cache()

    machine = {"gpu": torch.cuda.get_device_name() if cuda else "CPU dry run", "torch": torch.__version__,
               "python": platform.python_version()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "budget": budget, "machine": machine,
                                                    "shape": [L, Hq, H, D, hidden, inter]}, indent=2))
    cmd = "python benchmarks/gpu_compress.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Compression's share of time-to-first-token (one request)", "",
        f"Machine: {machine['gpu']}, torch {torch.__version__}, Python {machine['python']}.",
        f"Command: `{cmd}` (via `scripts/gpu_check.sh`).", "",
        f"Shape: {L} layers, {Hq} query / {H} KV heads, head_dim {D}, hidden {hidden}, MLP {inter}, "
        f"{str(dtype).replace('torch.', '')}; budget {budget} tokens per KV head. Prefill = the layers' "
        "projections, causal SDPA attention and MLP only (a lower bound of a real prefill), so the "
        "share is an upper bound. Compress = `CompressionManager.compress`, all layers, scoring to pool "
        f"write; median of {a.repeats}.", "",
        "| prompt | policy | prefill (ms) | compress (ms) | share of TTFT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['policy']} | {r['prefill_ms']:.1f} | {r['compress_ms']:.1f} | "
                     f"{100 * r['ttft_share']:.1f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
