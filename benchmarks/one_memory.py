"""One KV memory vs a fixed split, at the same KV memory: three workloads through SGLang's bench_serving.

    python benchmarks/one_memory.py --out benchmarks/results/one_memory_cpu
    python benchmarks/one_memory.py --configs plain split:0.5 shared --workloads long --kv-memory 8192

Every server gets the same ``--max-total-tokens`` (the KV memory, in tokens of this model):

- ``plain``: SGLang with no policy (all of it is SGLang's token pool, nothing compressed);
- ``split:F``: ``--kv-policy P --kv-pool-fraction F`` (F of the memory becomes the compressed pool);
- ``shared``: ``--kv-policy P --kv-memory shared`` (one memory: pages live in SGLang's token slots).

Workloads (each one ``sglang.bench_serving`` run, random-token prompts, ignore EOS, the
radix cache flushed after its warmup request; the policy and budgets travel as
``custom_params``):

- ``long``: long prompts, short outputs;
- ``decode``: short prompts, long outputs, with ``kv_decode_budget`` (generated tokens move
  into pages once the tail outgrows the window);
- ``mix``: the long workload with a third of the requests ``kv_policy: full`` (two
  bench_serving runs at once on the same server; their outputs and TTFTs are pooled).

Per run: completed requests, peak running requests (the plugin's exact high-water mark),
output tokens/s, TTFT p50. Per server: the longest prompt it serves (SGLang's
``max_req_input_len`` at that memory, checked by serving one prompt of that length).
Servers run one after the other, so they never compete for the machine.

Writes ``OUT.json``, ``OUT.md`` (tables, machine, command) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.capacity import Peak, bench  # noqa: E402
from benchmarks.fidelity import budget_tokens, parse_budget  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

WORKLOADS = ("long", "decode", "mix")


def parse_config(text: str) -> tuple[str, float | None]:
    """'plain' | 'shared' | 'split:F' (0 < F < 1) -> (kind, fraction)."""
    if text in ("plain", "shared"):
        return text, None
    kind, _, frac = text.partition(":")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if kind != "split" or not 0.0 < f < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected plain, shared or split:F with 0 < F < 1")
    return kind, f


def server_args(config: str, policy: str, kv_memory: int, extra: list[str]) -> list[str]:
    kind, frac = parse_config(config)
    args = ["--max-total-tokens", str(kv_memory), "--sleep-on-idle", *extra]
    if kind == "split":
        args += ["--kv-policy", policy, "--kv-pool-fraction", str(frac)]
    elif kind == "shared":
        args += ["--kv-policy", policy, "--kv-memory", "shared"]
    return args


LONGEST_OUT = 8  # output tokens of the longest-prompt check: a request that ends with its
# prefill (one output token) is never compressed, so it would not show whether a compressed
# server can hold the prompt and its pages


def compressed_total(st: dict) -> int:
    """Requests compressed so far, every policy, from a plugin state."""
    return sum(p.get("compressed_requests_total", 0) for p in (st.get("policies") or {}).values())


def longest_prompt(srv: SGLangServer) -> dict:
    """SGLang's longest accepted input at this memory, and whether one prompt that long (less
    the check's output tokens) is served with ``LONGEST_OUT`` output tokens."""
    info = srv.get_json("/server_info")
    limit = int(info["max_req_input_len"])
    n = limit - LONGEST_OUT  # SGLang refuses len >= max_req_input_len; room for the output
    # token ids well inside the vocabulary, one request alone on the idle server
    ids = [100 + (i * 7919) % 20000 for i in range(n - 1)]
    st = srv.plugin_state()
    before = dict(st.get("fallbacks") or {})
    compressed_before = compressed_total(st)
    t = time.perf_counter()
    status, out = srv.post_json("/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": LONGEST_OUT, "temperature": 0, "ignore_eos": True}}, timeout=3600)
    meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
    served = status == 200 and meta.get("prompt_tokens") == n - 1 and meta.get("completion_tokens") == LONGEST_OUT
    seconds = round(time.perf_counter() - t, 1)
    st = srv.wait_idle(600)
    after = st.get("fallbacks") or {}
    compressed = compressed_total(st)
    # a prompt too long to be held with its pages is served whole: a fallback, said so
    fell_back = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    return {"max_req_input_len": limit, "served_tokens": n - 1 if served else 0, "output_tokens": LONGEST_OUT,
            "status": status, "seconds": seconds, "fallback": fell_back,
            "compressed": compressed > compressed_before, **({} if served else {"error": str(out)[:300]})}


def run_workload(srv: SGLangServer, mdir: Path, name: str, a, compressed: bool, files: str) -> dict:
    """One workload on one server: bench_serving run(s) under a Peak poller -> a result row."""
    policy = {"kv_policy": a.policy, "kv_budget": budget_tokens(a.budget, a.long_len)} if compressed else None
    if name == "long":
        jobs = [(a.long_len, a.long_out, a.concurrency, a.requests, policy)]
    elif name == "decode":
        dec = ({"kv_policy": a.policy, "kv_budget": budget_tokens(a.budget, a.short_len),
                "kv_decode_budget": a.decode_budget} if compressed else None)
        jobs = [(a.short_len, a.short_out, a.concurrency, a.requests, dec)]
    else:  # mix: a third kv_policy full (on a plain server both parts are plain requests)
        n_full, c_full = max(1, a.requests // 3), max(1, a.concurrency // 3)
        full = {"kv_policy": "full"} if compressed else None
        jobs = [(a.long_len, a.long_out, c_full, n_full, full),
                (a.long_len, a.long_out, a.concurrency - c_full, a.requests - n_full, policy)]
    rows: list[dict] = [{}] * len(jobs)
    errors: list[BaseException] = []

    def go(i: int, job) -> None:
        length, out_len, conc, n, params = job
        try:
            rows[i] = bench(srv, mdir, length, out_len, conc, n, params, Path(f"{files}.{name}.{i}.jsonl"),
                            seed=1000 + 17 * i + length, details=True, warmup=False, require_all=False)
        except RuntimeError as e:  # bench_serving itself fails when no request completes
            rows[i] = {"completed": 0, "total_output_tokens": 0, "duration": 0.0, "ttfts": [],
                       "peak_running": 0, "peak_compressed": 0, "error": str(e)[-300:]}
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with Peak(srv) as peak:
        threads = [threading.Thread(target=go, args=(i, j)) for i, j in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    ttfts = [x for r in rows for x in r["ttfts"] if x]  # a failed request's TTFT is 0
    out_tokens = sum(r["total_output_tokens"] for r in rows)
    duration = max(r["duration"] for r in rows)
    st = srv.wait_idle(600)
    limit = int(srv.get_json("/server_info")["max_req_input_len"])
    done = sum(r["completed"] for r in rows)
    return {"workload": name, "refused": done < sum(j[3] for j in jobs) and max(j[0] for j in jobs) >= limit, "completed": sum(r["completed"] for r in rows), "requests": sum(j[3] for j in jobs),
            "prompt_tokens": jobs[-1][0], "output_len": jobs[-1][1], "concurrency": sum(j[2] for j in jobs),
            "duration_s": round(duration, 1), "output_throughput": out_tokens / duration if duration else 0.0,
            # every poller's read takes the server's high-water marks since the previous read
            # (bench() polls too): the peak is the largest any of them saw
            "median_ttft_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "errors": [r["error"] for r in rows if r.get("error")],
            "peak_running": max([peak.running, *(r["peak_running"] for r in rows)]),
            "peak_compressed": max([peak.compressed, *(r["peak_compressed"] for r in rows)]), "fallbacks": st.get("fallbacks", {}),
            "params": [j[4] for j in jobs]}


def run_server(config: str, a, mdir: Path, rnd: int, longest: bool, row: dict) -> list[dict]:
    """One server of ``config``: every workload (the radix cache flushed after each), then the
    longest-prompt check (into ``row``), its pool checked empty at the end -> the workload rows."""
    compressed = config != "plain"
    slug = f"{a.out}.{config.replace(':', '-')}" + (f".r{rnd}" if rnd else "")
    runs = []
    with SGLangServer(mdir, server_args(config, a.policy, a.kv_memory, a.server_arg),
                      log_path=f"{slug}.server.log") as srv:
        row["token_pool"] = srv.plugin_state()["token_pool"]["total"]
        for w in a.workloads:
            print(f"[one_memory] round {rnd + 1}/{a.rounds}, {config}: {w}", flush=True)
            runs.append(run_workload(srv, mdir, w, a, compressed, slug))
            srv.flush_cache()
        if longest:
            print(f"[one_memory] {config}: longest prompt", flush=True)
            row["longest"] = longest_prompt(srv)
        st = srv.wait_idle(600)
        if compressed:
            assert st["integrity"] == "ok" and st["pool"]["used_pages"] == 0, st
        row["end_state"] = {k: st.get(k) for k in ("integrity", "fallbacks", "token_pool", "pool")}
    return runs


def aggregate(runs: list[dict]) -> dict:
    """One workload's runs on one configuration (one per round) -> its row: medians of output
    tok/s and TTFT p50, the highest peak, the fewest completed, fallbacks summed; each round's
    tok/s and TTFT kept (``per_round``)."""
    if len(runs) == 1:
        return {**runs[0], "per_round": None}
    ttfts = [r["median_ttft_ms"] for r in runs if r["median_ttft_ms"] is not None]
    fallbacks: dict[str, int] = {}
    for r in runs:
        for k, v in r["fallbacks"].items():
            fallbacks[k] = fallbacks.get(k, 0) + v
    worst = min(runs, key=lambda r: r["completed"])
    return {**worst, "output_throughput": statistics.median(r["output_throughput"] for r in runs),
            "median_ttft_ms": statistics.median(ttfts) if ttfts else None,
            "peak_running": max(r["peak_running"] for r in runs),
            "peak_compressed": max(r["peak_compressed"] for r in runs), "fallbacks": fallbacks,
            "errors": [e for r in runs for e in r["errors"]],
            "per_round": [{"output_throughput": r["output_throughput"], "median_ttft_ms": r["median_ttft_ms"],
                           "peak_running": r["peak_running"], "completed": r["completed"]} for r in runs]}


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# One KV memory vs a fixed split",
        "",
        f"Machine: {meta['machine']}. Model: SmolLM2-135M-Instruct. KV memory: {meta['kv_memory']} tokens "
        f"(`--max-total-tokens`) for every server. Policy {meta['policy']}, budget {meta['budget']} of each "
        f"prompt per KV head; decode workload `kv_decode_budget` {meta['decode_budget']}. Load: `sglang.bench_serving` "
        f"(random-token prompts, ignore EOS), {meta['requests']} requests at concurrency {meta['concurrency']} per "
        f"workload. {meta['wall_s'] / 60:.0f} min." + (
            f" {meta['rounds']} rounds (every server started once per round, odd rounds in reverse order): "
            "tok/s and TTFT are medians over the rounds, each round's value in brackets; peak running is the "
            "highest, completed the fewest of any round." if meta.get("rounds", 1) > 1 else ""),
        f"Command: `{meta['command']}`",
        "",
        "Workloads: **long** = "
        f"{meta['long_len']}-token prompts, {meta['long_out']} output tokens; **decode** = {meta['short_len']}-token "
        f"prompts, {meta['short_out']} output tokens; **mix** = long with a third of the requests `kv_policy: full`.",
        "",
        "| server | workload | completed | peak running | output tok/s | TTFT p50 (ms) | fallbacks |",
        "|---|---|---|---|---|---|---|",
    ]
    if not any(s["workloads"] for s in results):
        lines = lines[:lines.index("") + 1 + 2]  # the title, machine and command only: no workload ran
    for s in results:
        for r in s["workloads"]:
            fb = ", ".join(f"{k} {v}" for k, v in r["fallbacks"].items()) or "-"
            ttft = "-" if r["median_ttft_ms"] is None else f"{r['median_ttft_ms']:.0f}"
            refused = (" (refused: prompt longer than the server's limit)"
                       if r["completed"] < r["requests"] and r.get("refused")
                       else "")
            tps = f"{r['output_throughput']:.1f}"
            if r.get("per_round"):  # the median, then each round's value in the order run
                tps += " (" + " / ".join(f"{x['output_throughput']:.1f}" for x in r["per_round"]) + ")"
                ttft += " (" + " / ".join("-" if x["median_ttft_ms"] is None else f"{x['median_ttft_ms']:.0f}"
                                          for x in r["per_round"]) + ")"
            peak = "-" if refused else r["peak_running"]  # refused requests pass through a batch to be aborted
            lines.append(f"| {s['config']} | {r['workload']} | {r['completed']}/{r['requests']}{refused} | "
                         f"{peak} | {tps} | {ttft} | {fb} |")
    if meta.get("note"):
        lines += ["", meta["note"]]
    if meta.get("longest"):
        lines += ["", f"Longest prompt: {meta['longest']}."]
    longest = [s for s in results if s.get("longest")]
    if longest:
        lines += ["", f"Longest prompt served: SGLang's `max_req_input_len` at this memory less {LONGEST_OUT} tokens, "
                  f"sent alone with {LONGEST_OUT} output tokens (the server's default policy and budget):", "",
                  "| server | token pool | longest prompt served | its KV |", "|---|---|---|---|"]
    for s in longest:
        lp = s["longest"]
        kv = ("compressed" if lp.get("compressed") else
              "whole (" + ", ".join(lp["fallback"]) + " fallback)" if lp.get("fallback") else "whole")
        cell = (f"{lp['served_tokens']} tokens ({lp['seconds']} s)" if lp["served_tokens"]
                else f"not served: {lp.get('error')}")
        lines.append(f"| {s['config']} | {s['token_pool']} | {cell} | {kv} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["config"] for s in results]
    workloads = list(dict.fromkeys(r["workload"] for s in results for r in s["workloads"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / max(1, len(workloads))
    for k, w in enumerate(workloads):
        xs = [i + k * width for i in range(len(names))]
        rows = [next((r for r in s["workloads"] if r["workload"] == w), None) for s in results]
        for ax, key in zip(axes[:2], ("output_throughput", "peak_running")):
            ax.bar(xs, [r[key] if r and not r.get("refused") else 0 for r in rows], width, label=w)
    axes[2].bar(range(len(names)), [(s.get("longest") or {}).get("served_tokens", 0) for s in results], 0.6,
                color="grey")
    for ax, title in zip(axes, ("output tokens/s", "peak running requests", "longest prompt served (tokens)")):
        ax.set_title(title)
        ax.set_xticks([i + (0.4 - width / 2 if ax is not axes[2] else 0) for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-memory", type=int, default=4096, help="--max-total-tokens of every server (4096)")
    p.add_argument("--configs", nargs="+", default=["plain", "split:0.25", "split:0.5", "split:0.75", "shared"],
                   help="plain, split:F, shared (default: plain split:0.25 split:0.5 split:0.75 shared)")
    p.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS),
                   help="long decode mix (default: all three; none: only the longest prompt)")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-prompt check")
    p.add_argument("--policy", default="headkv")
    p.add_argument("--budget", default="10%", help="per KV head: share of the prompt (10%%) or tokens")
    p.add_argument("--decode-budget", type=int, default=32, help="kv_decode_budget of the decode workload (32)")
    p.add_argument("--long-len", type=int, default=1024)
    p.add_argument("--long-out", type=int, default=8)
    p.add_argument("--short-len", type=int, default=64)
    p.add_argument("--short-out", type=int, default=320)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--server-arg", action="append", default=[], help="extra launch_server flag(s), repeatable")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/one_memory_cpu"))
    p.add_argument("--rounds", type=int, default=1,
                   help="start every server this many times (odd rounds in reverse order); the table shows "
                        "medians and each round's values (1)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        parse_budget(a.budget)
        for c in a.configs:
            parse_config(c)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if min(a.long_len, a.short_len) < 16 or min(a.long_out, a.short_out, a.requests, a.concurrency) < 1:
        p.error("--long-len/--short-len must be >= 16; outputs, --requests and --concurrency >= 1")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if "mix" in a.workloads and (a.requests < 3 or a.concurrency < 2):
        p.error("the mix workload needs --requests >= 3 and --concurrency >= 2")
    if a.kv_memory < 2 * a.long_len:
        p.error(f"--kv-memory {a.kv_memory} cannot hold two prompts of {a.long_len} tokens")

    mdir = models.model_dir()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    by_config: dict[str, dict] = {}
    for rnd in range(a.rounds):
        # every round starts each server anew; odd rounds in reverse order (a drifting machine
        # load falls on every configuration alike)
        for config in (a.configs if rnd % 2 == 0 else a.configs[::-1]):
            row = by_config.setdefault(config, {"config": config, "rounds": []})
            row["rounds"].append(run_server(config, a, mdir, rnd, longest=not a.no_longest and rnd == 0, row=row))
            Path(f"{a.out}.partial.json").write_text(json.dumps(list(by_config.values()), indent=1) + "\n")
    results = [by_config[c] for c in a.configs]
    for row in results:
        row["workloads"] = [aggregate([r[i] for r in row["rounds"]]) for i in range(len(a.workloads))]
    meta = {"machine": machine(), "kv_memory": a.kv_memory, "policy": a.policy, "budget": a.budget,
            "decode_budget": a.decode_budget, "long_len": a.long_len, "long_out": a.long_out,
            "short_len": a.short_len, "short_out": a.short_out, "requests": a.requests,
            "concurrency": a.concurrency, "rounds": a.rounds, "wall_s": round(time.time() - t0),
            "command": "python benchmarks/one_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = markdown(meta, results)
    if not a.no_plots:
        plot(results, f"{a.out}.png")
        md += f"\n![one memory]({out.name}.png)\n"
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
