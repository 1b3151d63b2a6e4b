"""The GPU server check's table: ``scripts/gpu_server_check.sh`` results -> Markdown.

Each run of ``python -m sglang.bench_serving`` against one server is a directory
``RUNS/<server>__<shape>__c<concurrency>/`` holding:

* ``bench.jsonl`` — bench_serving's ``--output-file`` (its last line is the run);
* ``samples.jsonl`` — ``/server_info`` polled during the run, one JSON object a line
  (the plugin's state is ``internal_states[0]["headkv_sglang"]``);
* ``metrics_before.txt`` / ``metrics_after.txt`` — ``/metrics`` (Prometheus text) around
  the run: ``sglang:cuda_graph_passes_total{mode="decode_cuda_graph"}`` counts decode
  batches that replayed a CUDA graph, ``mode="decode_none"`` the eager ones.

Per run: peak running requests, output tok/s, TTFT p50/p99, ITL p50/p99, decode batches
replayed as graphs vs run eagerly (and the headkv backend's ``graph_fallback_batches``:
eager because of compressed rows), and the peak KV held (SGLang's token pool in use, and
the compressed pool's pages in use).

``python benchmarks/server_table.py RUNS --model MODEL_DIR --out RESULT.md`` (also writes
``RESULT.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_PASSES = re.compile(r'^sglang:cuda_graph_passes_total\{([^}]*)\}\s+([0-9.eE+-]+)\s*$', re.M)
GIB = 1 << 30


def graph_passes(text: str) -> dict[str, float]:
    """``/metrics`` text -> {mode: count} of ``sglang:cuda_graph_passes_total`` (summed over labels)."""
    out: dict[str, float] = {}
    for labels, value in _PASSES.findall(text):
        m = re.search(r'mode="([^"]*)"', labels)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(value)
    return out


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 2) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    q = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // q)
    return 2 * int(cfg["num_hidden_layers"]) * int(cfg.get("num_key_value_heads", q)) * head_dim * dtype_bytes


def plugin_state(info: dict) -> dict:
    states = info.get("internal_states") or [{}]
    return states[0].get("headkv_sglang", {})


def summarize(run: Path, bytes_per_token: int) -> dict:
    """One run directory -> one table row (a dict)."""
    server, shape, conc = run.name.split("__")
    lines = [ln for ln in (run / "bench.jsonl").read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{run}/bench.jsonl: bench_serving wrote no result")
    b = json.loads(lines[-1])
    samples = []
    if (run / "samples.jsonl").exists():
        for ln in (run / "samples.jsonl").read_text().splitlines():
            try:
                samples.append(plugin_state(json.loads(ln)))
            except (ValueError, AttributeError):
                continue  # a poll cut short by the server's shutdown
    peak_running = max([max(s.get("token_pool", {}).get("running_requests", 0),
                            s.get("token_pool", {}).get("peak_running_requests_since_last_read", 0))
                        for s in samples] or [0])
    # --kv-memory shared: the slots lent to pages are not SGLang's available ones, and the pages
    # in them are counted below (used pages, not whole chunks): not twice
    token_held = max([s["token_pool"]["total"] - s["token_pool"]["available"] - s["token_pool"]["evictable"]
                      - s.get("memory", {}).get("slots_borrowed_by_pages", 0)
                      for s in samples if "token_pool" in s] or [0])
    page_held = max([s.get("pool", {}).get("used_pages", 0) * s.get("pool", {}).get("bytes_per_page", 0)
                     for s in samples] or [0])
    before = graph_passes((run / "metrics_before.txt").read_text()) if (run / "metrics_before.txt").exists() else {}
    after = graph_passes((run / "metrics_after.txt").read_text()) if (run / "metrics_after.txt").exists() else {}
    fallback = [s.get("attention_backend", {}).get("graph_fallback_batches") for s in samples]
    fallback = [f for f in fallback if f is not None]
    return {
        "server": server, "shape": shape, "concurrency": int(conc.lstrip("c")),
        "completed": b.get("completed"), "input_len": b.get("random_input_len"),
        "output_len": b.get("random_output_len"),
        "peak_running": peak_running, "output_tok_s": b.get("output_throughput"),
        "ttft_p50_ms": b.get("median_ttft_ms"), "ttft_p99_ms": b.get("p99_ttft_ms"),
        "itl_p50_ms": b.get("median_itl_ms"), "itl_p99_ms": b.get("p99_itl_ms"),
        "graph_batches": after.get("decode_cuda_graph", 0) - before.get("decode_cuda_graph", 0),
        "eager_batches": after.get("decode_none", 0) - before.get("decode_none", 0),
        "headkv_eager_batches": (fallback[-1] - fallback[0]) if len(fallback) > 1 else None,
        "kv_held_gib": (token_held * bytes_per_token + page_held) / GIB,
        "token_pool_held_tokens": token_held, "compressed_held_gib": page_held / GIB,
    }


def table(rows: list[dict]) -> str:
    head = ("| server | shape | concurrency | done | peak running | output tok/s | TTFT p50 / p99 (ms) | "
            "ITL p50 / p99 (ms) | decode batches: graph / eager | KV held peak (GiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in sorted(rows, key=lambda r: (r["shape"], r["server"], r["concurrency"])):
        eager = f"{r['eager_batches']:.0f}"
        if r["headkv_eager_batches"]:
            eager += f" ({r['headkv_eager_batches']} compressed rows)"
        out.append(f"| {r['server']} | {r['shape']} | {r['concurrency']} | {r['completed']} | {r['peak_running']} | "
                   f"{r['output_tok_s']:.0f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                   f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['graph_batches']:.0f} / {eager} | "
                   f"{r['kv_held_gib']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="directory of <server>__<shape>__c<N> run directories")
    ap.add_argument("--model", type=Path, required=True, help="the served model directory (its config.json)")
    ap.add_argument("--out", type=Path, help="write OUT (Markdown) and OUT with .json")
    ap.add_argument("--title", default="GPU server check")
    ap.add_argument("--note", default="", help="text under the title (machine, command, caveats)")
    a = ap.parse_args(argv)
    bpt = kv_bytes_per_token(a.model)
    rows = []
    for run in sorted(p for p in a.runs.iterdir() if p.is_dir() and p.name.count("__") == 2):
        try:
            rows.append(summarize(run, bpt))
        except (OSError, ValueError, KeyError) as e:
            print(f"skipped {run.name}: {e}", file=sys.stderr)
    md = f"# {a.title}\n\n{a.note}\n\n{table(rows)}" if rows else f"# {a.title}\n\nno completed run\n"
    if a.out:
        a.out.write_text(md)
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()
