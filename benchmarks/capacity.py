"""Capacity at a fixed KV memory: concurrent requests, output tokens/s and TTFT, full KV vs a policy.

    python benchmarks/capacity.py --budget 5% --out benchmarks/results/capacity_cpu   # full vs headkv
    python benchmarks/capacity.py --policies headkv snapkv --budget 10% --lengths 2048 --concurrency 1 8 32

Two servers with the same ``--max-total-tokens`` (the KV memory, in tokens of this model):
plain SGLang (full KV: all of it is SGLang's token pool), then ``--kv-policy POLICY`` (the
same memory split between SGLang's token pool and the compressed pool). They run one
after the other, so they never compete for the CPU/GPU. SGLang's own
``python -m sglang.bench_serving`` is the load generator (``--backend sglang-oai``,
random token prompts of each length, fixed output length, ignore-EOS); the policy and
budget travel as ``custom_params`` in ``--extra-request-body``. While it runs, the script
polls ``/server_info`` for the running-request count (its peak is the measured capacity).

Compression overhead: on the policy server, TTFT and end-to-end latency of the same
prompts at concurrency 1 with the policy vs with ``kv_policy=full`` per request (the
radix cache is flushed before each measured run).

Writes ``OUT.json`` (every bench_serving result line and the peaks), ``OUT.md`` (table,
machine) and ``OUT.png`` (tokens/s and running requests vs concurrency). Runs on a GPU as
is (pass ``--server-arg`` for the GPU flags; the plugin adds CPU flags only on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fidelity import budget_tokens, parse_budget  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402


class Peak(threading.Thread):
    """Polls ``/server_info`` and keeps the peak running (and compressed) request counts.

    Both peaks are exact however short the requests: the plugin keeps the largest batch run
    and the most compressed requests held since the previous read.
    """

    def __init__(self, srv: SGLangServer, period: float = 0.25):
        super().__init__(daemon=True)
        self.srv, self.period = srv, period
        self.running = self.compressed = 0
        self.stop_event = threading.Event()

    def poll(self) -> None:
        try:
            st = self.srv.plugin_state()
        except Exception:  # noqa: BLE001 - a slow poll under load is not a failure
            return
        pool = st["token_pool"]
        self.running = max(self.running, pool["running_requests"],
                           pool.get("peak_running_requests_since_last_read", 0))
        self.compressed = max(self.compressed, st.get("running_compressed_requests", 0),
                              st.get("peak_running_compressed_requests_since_last_read", 0))

    def run(self):
        while not self.stop_event.is_set():
            self.poll()
            self.stop_event.wait(self.period)

    def __enter__(self):
        self.srv.plugin_state()  # resets the server's peaks: what came before is not this run's
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.join(5)
        self.poll()  # whatever ran after the thread's last poll


def bench(srv: SGLangServer, mdir: Path, length: int, out_len: int, concurrency: int, n: int,
          custom_params: dict | None, result_file: Path, seed: int, details: bool = False,
          warmup: bool = True, require_all: bool = True) -> dict:
    """One ``sglang.bench_serving`` run; returns its result line plus the peak running counts
    (``details``: with each request's TTFT under ``ttfts``; ``warmup=False``: no warmup
    request and no flush after it, for runs that share a server at the same time;
    ``require_all=False``: a run where some requests failed is returned, not raised)."""
    extra = {"custom_params": custom_params} if custom_params else {}
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai", "--base-url", srv.url,
           "--model", "default", "--tokenizer", str(mdir), "--dataset-name", "random-ids",
           "--random-input-len", str(length), "--random-output-len", str(out_len), "--random-range-ratio", "1.0",
           "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--seed", str(seed), "--output-file", str(result_file), "--disable-tqdm"]
    # the radix cache is emptied after bench_serving's warmup request: no measured request
    # reuses a prompt that an earlier run (or the warmup) prefilled
    cmd += ["--flush-cache"] if warmup else ["--warmup-requests", "0"]
    if details:
        cmd += ["--output-details"]
    if extra:
        cmd += ["--extra-request-body", json.dumps(extra)]
    before = result_file.read_text().count("\n") if result_file.exists() else 0
    with Peak(srv) as peak:
        # offline: bench_serving looks the model name ("default") up on the HF hub for a chat
        # template, and without network that is ~47 s of retries per run
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"bench_serving failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    lines = result_file.read_text().splitlines()
    if len(lines) <= before:
        raise RuntimeError(f"bench_serving wrote no result:\n{r.stdout[-2000:]}")
    res = json.loads(lines[-1])
    keep = ["completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
            "input_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
            "median_tpot_ms", "median_e2e_latency_ms", "concurrency"]
    row = {k: res.get(k) for k in keep}
    if row["completed"] != n and require_all:
        raise RuntimeError(f"only {row['completed']}/{n} requests completed:\n{r.stdout[-2000:]}")
    row.update(peak_running=peak.running, peak_compressed=peak.compressed)
    if details:
        row["ttfts"] = res["ttfts"]
    return row


def where_note(meta: dict) -> str:
    """Where compression ran in the measured version: inside the prefill (part of TTFT) or after it."""
    if meta.get("compressed_in") == "forward":
        return "Compression runs inside the prefill forward, so it is part of TTFT."
    return ("Measured when compression ran after the prefill: the first token came before it, so it shows "
            "in the end-to-end latency.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-memory", type=int, default=16384,
                   help="--max-total-tokens for both servers: the fixed KV memory, in tokens (16384)")
    p.add_argument("--policies", nargs="+", default=["headkv"])
    p.add_argument("--budget", default="5%", help="per KV head: share of the prompt (5%%) or tokens (128)")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048], help="prompt tokens")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    p.add_argument("--requests", type=int, default=0,
                   help="requests per run (default: max(concurrency, 4))")
    p.add_argument("--overhead-requests", type=int, default=3)
    p.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag(s), repeatable")
    p.add_argument("--pool-fraction", type=float, default=0.5, help="--kv-pool-fraction of the policy server")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/capacity_cpu"))
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        parse_budget(a.budget)
    except argparse.ArgumentTypeError as e:
        p.error(f"--budget: {e}")
    if any(c < 1 for c in a.concurrency) or any(n < 64 for n in a.lengths) or a.output_len < 1:
        p.error("--concurrency must be >= 1, --lengths >= 64 and --output-len >= 1")
    if a.kv_memory < 2 * max(a.lengths):
        p.error(f"--kv-memory {a.kv_memory} cannot hold two prompts of {max(a.lengths)} tokens")

    mdir = models.model_dir()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_file = Path(f"{a.out}.bench_serving.jsonl")
    result_file.unlink(missing_ok=True)
    base = ["--max-total-tokens", str(a.kv_memory), "--sleep-on-idle", *a.server_arg]
    runs: list[dict] = []
    overhead: list[dict] = []
    t0 = time.time()
    for server in ["full", *a.policies]:
        args = list(base)
        if server != "full":
            args += ["--kv-policy", server, "--kv-pool-fraction", str(a.pool_fraction)]
        with SGLangServer(mdir, args, log_path=f"{a.out}.{server}.server.log") as srv:
            st = srv.plugin_state()
            mem = {"token_pool": st["token_pool"]["total"],
                   "compressed_pool_token_equivalents": st.get("compressed_pool_token_equivalents", 0)}
            for length in a.lengths:
                params = None if server == "full" else {"kv_policy": server,
                                                        "kv_budget": budget_tokens(a.budget, length)}
                for c in a.concurrency:
                    n = a.requests or max(c, 4)
                    print(f"[capacity] {server} prompt {length} concurrency {c}: {n} requests", flush=True)
                    row = bench(srv, mdir, length, a.output_len, c, n, params, result_file, seed=length + c)
                    row.update(server=server, prompt_tokens=length, max_concurrency=c, requests=n,
                               budget_tokens=params["kv_budget"] if params else None, **mem)
                    runs.append(row)
                    srv.wait_idle()
                if server != "full":
                    for kind, cp in (("full", {"kv_policy": "full"}), (server, params)):
                        row = bench(srv, mdir, length, a.output_len, 1, a.overhead_requests, cp, result_file,
                                    seed=7 * length)
                        overhead.append({"server": server, "prompt_tokens": length, "request_policy": kind,
                                         "median_ttft_ms": row["median_ttft_ms"], "mean_ttft_ms": row["mean_ttft_ms"],
                                         "median_e2e_latency_ms": row["median_e2e_latency_ms"],
                                         "median_tpot_ms": row["median_tpot_ms"]})
                        srv.wait_idle()
            st = srv.wait_idle()
            if server != "full":
                assert st["pool"]["used_pages"] == 0 and st["integrity"] == "ok", st
    wall = time.time() - t0

    # where this version compresses (see serving/lifecycle.py): inside the prefill forward
    meta = {"machine": machine(), "kv_memory_tokens": a.kv_memory, "budget": a.budget, "policies": a.policies,
            "compressed_in": "forward",
            "output_len": a.output_len, "wall_s": round(wall), "pool_fraction": a.pool_fraction,
            "command": "python benchmarks/capacity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "runs": runs, "overhead": overhead}, indent=1) + "\n")
    md = markdown(meta, runs, overhead)
    if not a.no_plots:
        plot(runs, f"{a.out}.png")
        md += f"\n![capacity]({Path(a.out).name}.png)\n"
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


def markdown(meta: dict, runs: list[dict], overhead: list[dict]) -> str:
    lines = [
        "# Capacity at a fixed KV memory",
        "",
        f"Machine: {meta['machine']}. Model: SmolLM2-135M-Instruct. KV memory: {meta['kv_memory_tokens']} tokens "
        f"(`--max-total-tokens`) for every server; the policy servers move {meta['pool_fraction']:.0%} of it to "
        f"the compressed pool. Budget {meta['budget']} of each prompt per KV head. Load: "
        f"`sglang.bench_serving` (random-token prompts, {meta['output_len']} output tokens, ignore EOS). "
        f"{meta['wall_s'] / 60:.0f} min.",
        f"Command: `{meta['command']}`",
        "",
        "| server | prompt | concurrency | requests | peak running | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        name = r["server"] if r["server"] == "full" else f"{r['server']} ({r['budget_tokens']} tok/head)"
        lines.append(f"| {name} | {r['prompt_tokens']} | {r['max_concurrency']} | {r['requests']} | "
                     f"{r['peak_running']} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | "
                     f"{r['p99_ttft_ms']:.0f} |")
    if overhead:
        lines += ["", "Compression overhead (same server and prompts, concurrency 1, medians). " + where_note(meta), "",
                  "| server | prompt | TTFT full | TTFT compressed | e2e full | e2e compressed | e2e overhead |",
                  "|---|---|---|---|---|---|---|"]
        for length in sorted({o["prompt_tokens"] for o in overhead}):
            for server in sorted({o["server"] for o in overhead}):
                f = [o for o in overhead if o["prompt_tokens"] == length and o["server"] == server]
                full = next(o for o in f if o["request_policy"] == "full")
                comp = next(o for o in f if o["request_policy"] != "full")
                e2e = (full.get("median_e2e_latency_ms"), comp.get("median_e2e_latency_ms"))
                e2e_cells = (f"{e2e[0]:.0f} ms | {e2e[1]:.0f} ms | {100 * (e2e[1] / e2e[0] - 1):+.0f}%"
                             if None not in e2e else "- | - | -")
                lines.append(f"| {server} | {length} | {full['median_ttft_ms']:.0f} ms | "
                             f"{comp['median_ttft_ms']:.0f} ms | {e2e_cells} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prompt_tokens"] for r in runs})
    fig, axes = plt.subplots(2, len(lengths), figsize=(4.2 * len(lengths), 6), squeeze=False)
    for j, length in enumerate(lengths):
        for server in dict.fromkeys(r["server"] for r in runs):
            rs = [r for r in runs if r["server"] == server and r["prompt_tokens"] == length]
            xs = [r["max_concurrency"] for r in rs]
            axes[0][j].plot(xs, [r["output_throughput"] for r in rs], marker="o", label=server)
            axes[1][j].plot(xs, [r["peak_running"] for r in rs], marker="o", label=server)
        axes[0][j].set_title(f"{length}-token prompts")
        axes[0][j].set_ylabel("output tokens/s")
        axes[1][j].set_ylabel("peak running requests")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
