"""benchmarks/server_table.py on synthetic bench_serving / /server_info / /metrics files
(CPU, fast, no server)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import server_table  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "hidden_size": 4096}


def metrics(graph: float, eager: float) -> str:
    return ("# HELP sglang:cuda_graph_passes_total ...\n# TYPE sglang:cuda_graph_passes_total counter\n"
            f'sglang:cuda_graph_passes_total{{model_name="m",mode="decode_cuda_graph",tp_rank="0"}} {graph}\n'
            f'sglang:cuda_graph_passes_total{{model_name="m",mode="decode_none",tp_rank="0"}} {eager}\n'
            'sglang:num_running_reqs{model_name="m"} 3.0\n')


def info(running: int, peak: int, total: int, available: int, evictable: int, pages: int | None,
         fallback: int | None, borrowed: int | None = None) -> dict:
    st = {"token_pool": {"total": total, "available": available, "evictable": evictable,
                         "running_requests": running, "peak_running_requests_since_last_read": peak}}
    if pages is not None:
        st["pool"] = {"used_pages": pages, "bytes_per_page": 8192}
        st["attention_backend"] = {"graph_fallback_batches": fallback}
    if borrowed is not None:  # --kv-memory shared: slots lent to the pages
        st["memory"] = {"slots_borrowed_by_pages": borrowed}
    return {"internal_states": [{"headkv_sglang": st}]}


def write_run(root: Path, name: str, bench: dict, samples: list[dict], before: str, after: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "bench.jsonl").write_text(json.dumps({"completed": 1}) + "\n" + json.dumps(bench) + "\n")
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples) + '{"internal_st')
    (d / "metrics_before.txt").write_text(before)
    (d / "metrics_after.txt").write_text(after)


def test_rows_and_table_from_synthetic_runs(tmp_path):
    rng = random.Random(7)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    bpt = 2 * 32 * 8 * 128 * 2
    assert server_table.kv_bytes_per_token(model) == bpt
    runs = tmp_path / "runs"
    expect = {}
    for server, pages in (("full", None), ("headkv", 37), ("headkv-shared", 37)):
        borrowed = 700 if server == "headkv-shared" else None  # of the used slots, these hold the pages
        for conc in (3, 17):
            bench = {"completed": 2 * conc, "random_input_len": 16384, "random_output_len": 256,
                     "output_throughput": rng.uniform(100, 900), "median_ttft_ms": rng.uniform(100, 900),
                     "p99_ttft_ms": rng.uniform(1000, 3000), "median_itl_ms": rng.uniform(5, 30),
                     "p99_itl_ms": rng.uniform(40, 90)}
            samples = [info(rng.randint(0, conc), rng.randint(0, conc), 200000, 200000 - u, e, p, f, borrowed)
                       for u, e, p, f in ((5000, 100, pages, 4), (91000, 1000, pages and pages * 3, 9),
                                          (20000, 0, pages and 2, 11))]
            peak = max(max(s["internal_states"][0]["headkv_sglang"]["token_pool"]["running_requests"],
                           s["internal_states"][0]["headkv_sglang"]["token_pool"]["peak_running_requests_since_last_read"])
                       for s in samples)
            write_run(runs, f"{server}__16k-256__c{conc}", bench, samples, metrics(10, 2), metrics(10 + 5 * conc, 2 + conc))
            held_slots = 90000 - (borrowed or 0)  # SGLang's own: the borrowed ones hold the pages, counted as pages
            expect[(server, conc)] = (bench, peak, (held_slots * bpt + (pages * 3 * 8192 if pages else 0)) / 2 ** 30)
    (runs / "not_a_run").mkdir()
    out = tmp_path / "res.md"
    rows = server_table.main([str(runs), "--model", str(model), "--out", str(out), "--note", "fused ops ran as torch"])
    assert len(rows) == 6
    for r in rows:
        bench, peak, held = expect[(r["server"], r["concurrency"])]
        assert r["shape"] == "16k-256" and r["completed"] == bench["completed"]
        assert r["output_tok_s"] == bench["output_throughput"] and r["itl_p99_ms"] == bench["p99_itl_ms"]
        assert r["ttft_p50_ms"] == bench["median_ttft_ms"] and r["ttft_p99_ms"] == bench["p99_ttft_ms"]
        assert r["peak_running"] == peak
        assert r["graph_batches"] == 5 * r["concurrency"] and r["eager_batches"] == r["concurrency"]
        assert r["headkv_eager_batches"] == (7 if r["server"] != "full" else None)
        assert r["kv_held_gib"] == pytest.approx(held)
    md = out.read_text()
    assert "fused ops ran as torch" in md and md.count("\n| ") == 7, md
    assert json.loads(out.with_suffix(".json").read_text()) == rows
    line = next(ln for ln in md.splitlines() if ln.startswith("| headkv | 16k-256 | 17 |"))
    assert "(7 compressed rows)" in line and f"{expect[('headkv', 17)][0]['output_throughput']:.0f}" in line


def test_graph_passes_sums_labels_and_ignores_other_series():
    text = metrics(3, 4) + 'sglang:cuda_graph_passes_total{mode="decode_cuda_graph",tp_rank="1"} 2.5e1\n'
    assert server_table.graph_passes(text) == {"decode_cuda_graph": 28.0, "decode_none": 4.0}
    assert server_table.graph_passes("sglang:other 1\n") == {}
