"""One command for every committed result: the fidelity grid, capacity at headkv's 97% budget,
the needle grid (48 cases per cell, resumable), the results section of
``docs/benchmarks-and-results.md`` (between its ``results:begin``/``results:end`` markers) and
the README's one results table (between ``summary:begin``/``summary:end``).

    python benchmarks/regenerate.py                 # run everything (CPU: ~4-5 h, the grids resumable), then the docs
    python benchmarks/regenerate.py --report-only   # rebuild both blocks from benchmarks/results/

The capacity run uses the smallest budget at which headkv keeps >= 97% of full KV's
short-answer score in the fidelity results (or the largest budget measured, said so, if
none does). Every number the two blocks show is read from the JSON files here.
The soak (``benchmarks/soak.py``) is a reliability run, not part of this; its summary is
quoted when ``soak_cpu.json`` exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
README, RESULTS_DOC = ROOT / "README.md", ROOT / "docs" / "benchmarks-and-results.md"
BEGIN, END = "<!-- results:begin (benchmarks/regenerate.py) -->", "<!-- results:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin (benchmarks/regenerate.py) -->", "<!-- summary:end -->"
TARGET = 0.97


def capacity_where_note(meta: dict) -> str:
    from benchmarks.capacity import where_note  # imports the dev server helpers: only when needed

    return where_note(meta)


def headkv_budget(fid: dict, target: float = TARGET) -> tuple[str, bool]:
    """Smallest budget where headkv's relative score >= target; (largest, False) if none."""
    rel = fid["summary"]["relative_to_full"]["headkv"]
    budgets = fid["meta"]["budgets"]
    for b in budgets:  # in the order measured: increasing
        if rel[b] is not None and rel[b] >= target:
            return b, True
    return budgets[-1], False


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _held(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


HELD_TOLERANCE = 0.10  # cells compared only when their KV held is within 10% of headkv's


def equal_held_ranking(rel: dict, kept: dict, policies: list[str], budget: str, ref: str = "headkv",
                       tol: float = HELD_TOLERANCE) -> tuple[list[str], dict[str, float | None]]:
    """At one budget: the policies whose KV actually held is within ``tol`` (relative) of
    ``ref``'s, best score first (ties keep the listed order), and the others with what they hold.

    A policy that keeps more than the budget (razor's retrieval heads keep every token) is
    not beaten fairly by one that keeps what it was given: it is left out of the ranking."""
    base = kept[ref][budget]
    same, other = [], {}
    for p in policies:
        k = kept[p][budget]
        if base is not None and k is not None and abs(k - base) <= tol * base:
            same.append(p)
        else:
            other[p] = k
    return sorted(same, key=lambda p: -(rel[p][budget] or 0)), other


def table_rows(s: dict, policies: list[str], budgets: list[str], bold: str | None = None) -> list[str]:
    """One markdown row per policy: score relative to full KV (KV held) per budget."""
    rel, kept, rows = s["relative_to_full"], s["kv_kept"], []
    for p in policies:
        cells = []
        for b in budgets:
            v = _pct(rel[p][b])
            v = f"**{v}**" if p == "headkv" and b == bold else v
            cells.append(f"{v} ({_held(kept[p][b])})")
        rows.append(f"| {p} | " + " | ".join(cells) + " |")
    return rows


def ranking_line(s: dict, policies: list[str], budgets: list[str]) -> str:
    """Where headkv ranks at each budget among the policies holding the same KV."""
    rel, ranks = s["relative_to_full"], []
    for b in budgets:
        order, other = equal_held_ranking(rel, s["kv_kept"], policies, b)
        if "headkv" not in order:
            ranks.append(f"{b}: headkv's KV held not measured")
            continue
        tied = [p for p in order if p != "headkv" and rel[p][b] is not None and rel["headkv"][b] is not None
                and abs(rel[p][b] - rel["headkv"][b]) < 1e-9]
        part = f"{b}: headkv ranks {order.index('headkv') + 1} of {len(order)} (best: {order[0]}"
        part += f"; tied with {', '.join(tied)})" if tied else ")"
        if other:
            part += " [not comparable: " + ", ".join(f"{p} holds {_held(k)}" for p, k in other.items()) + "]"
        ranks.append(part)
    return (f"Ranking by this score, among policies holding the same KV as headkv (±{HELD_TOLERANCE:.0%}) — "
            + "; ".join(ranks) + ".")


#: The main grid's command: every task, the six policies measured side by side since the first grid
#: (D2O and PoD have their own grids, ``fidelity_d2o_cpu`` and ``fidelity_pod_cpu``).
MAIN_ARGS = ["--policies", "headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor"]
NEEDLES = "fidelity_needles30_cpu"
#: The needle grid's command (issue 17: >= 30 needle cases per cell, single and with same-shaped
#: distractors; resumable, run in parts).
NEEDLES_ARGS = ["--tasks", "niah", "multikey", "--policies", "headkv", "snapkv", "adakv", "pyramidkv", "--budgets",
                "1%", "2%", "5%", "10%", "--niah-lengths", "1000", "2000", "4000", "7000", "3000", "5500",
                "--depths", "0.1", "0.3", "0.5", "0.7", "0.9", "--lengths", "1000", "2000", "3000", "4000", "5500",
                "7000", "--seeds", "3", "--kv-params", '{"kv_scoring": "question"}']


def defaults_note(meta: dict) -> str:
    """A sentence naming the policy defaults a grid was measured under that this checkout has changed
    since ("" when none): a grid is not re-run by every change of a default, but says so."""
    from benchmarks.fidelity import changed_defaults

    changed = changed_defaults(meta.get("kv_defaults"), meta.get("kv_params"), meta.get("policies"))
    if changed == ["not recorded"]:
        return "Measured before grids recorded their policy defaults: re-run to compare with this checkout's. "
    return f"Measured with policy defaults changed since ({', '.join(changed)}); re-run to update. " if changed else ""


def needles_part(fid: dict, root: str = "") -> list[str]:
    """The needle grid: many needle cases per cell (single, and multikey with same-shaped distractors),
    so that one answer moves a cell little; its shape and request parameters read from the grid."""
    meta, s = fid["meta"], fid["summary"]
    budgets, policies = meta["budgets"], meta["policies"]
    per_task, n = meta["cases_per_task"], meta["cases"]
    full = s["full_short_answer_total"]
    cases = [r for r in fid.get("rows", []) if r["policy"] == "full" and r["task"] == "niah"]
    shape = (f" ({len({r['target_tokens'] for r in cases})} lengths x {len({r['depth'] for r in cases})} depths)"
             if cases else "")
    what = f"{per_task.get('niah', 0)} with one needle{shape}" if per_task.get("niah") else ""
    if per_task.get("multikey"):
        what += (" and " if what else "") + (f"{per_task['multikey']} with four same-shaped needles, the "
                                             "question naming one (multikey)")
    params = dict(meta.get("kv_params") or {})
    how = []
    if params.get("kv_scoring") == "question":
        how.append("the question scoring the prompt (`kv_scoring: question`)")
        del params["kv_scoring"]
    how += [f"`{k}: {json.dumps(v)}`" for k, v in params.items()]
    lines = [
        f"**Needles, {n} cases per cell** — {meta['prompt_tokens'][0]}–{meta['prompt_tokens'][1]} tokens, {what}"
        + "".join(f", {h}" for h in how) + f"; full KV finds {full:.0f} of {n}, one answer "
        f"moves a cell by ~{100 / max(full, 1):.0f} points. {defaults_note(meta)}"
        "Score relative to full KV (KV held):",
        "",
        "| policy | " + " | ".join(budgets) + " |",
        "|---|" + "---|" * len(budgets),
        *table_rows(s, policies, budgets),
        "",
        ranking_line(s, policies, budgets),
        f"Details and heatmaps: [needle grid]({root}benchmarks/results/{NEEDLES}.md) (`{meta['command']}`).",
        "",
    ]
    return lines


def section(fid: dict, cap: dict | None, soak: dict | None, needles: dict | None = None, root: str = "") -> str:
    """The results block; ``root`` prefixes its links (``"../"`` for a file under docs/)."""
    meta, s = fid["meta"], fid["summary"]
    budgets, policies = meta["budgets"], meta["policies"]
    b97, met = headkv_budget(fid)
    rel = s["relative_to_full"]
    changed = defaults_note(meta)
    lines = [
        BEGIN,
        "",
        f"Measured on {meta['machine']} with the test model (SmolLM2-135M-Instruct); regenerate with "
        "`python benchmarks/regenerate.py`. Details, per-task tables and plots: "
        f"[fidelity]({root}benchmarks/results/fidelity_cpu.md)"
        + (f", [capacity]({root}benchmarks/results/capacity_cpu.md)" if cap else "")
        + (f", [soak]({root}benchmarks/results/soak_cpu.md)" if soak else "") + ".",
        "",
        f"**Quality kept** — short-answer tasks (needles over length x depth, multi-key with distractors, "
        f"multi-value, variable tracking, common words; {meta['cases']} cases of "
        f"{meta['prompt_tokens'][0]}–{meta['prompt_tokens'][1]} tokens), score relative to full KV on the same "
        f"cases (full KV scores {s['full_short_answer_total']:.1f} points in total), at a budget of tokens per "
        "KV head given as a share of the prompt; in brackets the share of the prompt's full KV each "
        "policy actually held there (server-reported, page rounding included)"
        + (f". {changed.rstrip()}" if changed else ":"),
        "",
        "| policy | " + " | ".join(budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    lines += table_rows(s, policies, budgets, bold=b97 if met else None)
    if met:
        lines.append(f"\nheadkv keeps >= {TARGET:.0%} of full KV's score from **{b97}** of the prompt's KV up.")
    else:
        lines.append(f"\nheadkv stays below {TARGET:.0%} of full KV at every budget measured (best: "
                     f"{_pct(max(v for v in rel['headkv'].values() if v is not None))}).")
    fulls = ", ".join(f"{t} {_pct(s['tasks'][t]['full'])}" for t in meta["tasks"] if t != "summary")
    lines.append(f"Caveat: the 135M test model is weak at these tasks even with full KV ({fulls}), so the pooled "
                 "score is dominated by the needle tasks, and with this few cases one answer moves a cell by "
                 f"~{100 / max(s['full_short_answer_total'], 1):.0f} points: read the columns as trends, not decimals.")
    lines.append(ranking_line(s, policies, budgets))
    if "summary" in meta["tasks"]:
        r = s["summary_rouge_l"]["headkv"]
        lines.append("Summaries, ROUGE-L of headkv's against full KV's: "
                     + ", ".join(f"{b} {r[b]:.2f}" for b in budgets if r[b] is not None) + ".")
    lines += ["", f"![accuracy vs budget]({root}benchmarks/results/fidelity_cpu_accuracy.png)", ""]
    if needles:
        lines += needles_part(needles, root)
    if cap:
        cm = cap["meta"]
        lines += [
            f"**Capacity** — the same KV memory ({cm['kv_memory_tokens']} tokens of this model) for full KV and "
            f"for headkv at {cm['budget']} of the prompt (`sglang.bench_serving`, {cm['output_len']} output "
            "tokens per request, highest concurrency measured):",
            "",
            "| prompt | server | peak running requests | output tok/s | TTFT p50 |",
            "|---|---|---|---|---|",
        ]
        top = max(r["max_concurrency"] for r in cap["runs"])
        for length in sorted({r["prompt_tokens"] for r in cap["runs"]}):
            for r in cap["runs"]:
                if r["prompt_tokens"] == length and r["max_concurrency"] == top:
                    lines.append(f"| {length} | {r['server']} | {r['peak_running']} | {r['output_throughput']:.1f} "
                                 f"| {r['median_ttft_ms'] / 1000:.1f} s |")
        ov = cap.get("overhead") or []
        if ov:
            parts = []
            for length in sorted({o["prompt_tokens"] for o in ov}):
                f = {o["request_policy"]: o for o in ov if o["prompt_tokens"] == length}
                comp = [v for k, v in f.items() if k != "full"][0]
                part = f"{length} tokens: TTFT {100 * (comp['median_ttft_ms'] / f['full']['median_ttft_ms'] - 1):+.0f}%"
                if comp.get("median_e2e_latency_ms") and f["full"].get("median_e2e_latency_ms"):
                    e2e = comp["median_e2e_latency_ms"] / f["full"]["median_e2e_latency_ms"] - 1
                    part += f", end-to-end {100 * e2e:+.0f}% ({cm['output_len']} tokens out)"
                parts.append(part)
            lines.append("\nCompression overhead at concurrency 1, same server and prompts: " + "; ".join(parts)
                         + ". " + capacity_where_note(cm))
        lines += ["", f"![capacity]({root}benchmarks/results/capacity_cpu.png)", ""]
    if soak:
        lines.append(f"**Soak** — {soak['requests']} mixed requests on a deliberately small pool in "
                     f"{soak['wall_s'] / 60:.0f} min: {soak['unexpected_errors']} unexpected errors, "
                     f"{soak['pool_used_pages']} leaked pages, {soak['token_slots_leaked']} leaked token slots, "
                     f"integrity {soak['integrity']}; full-KV answers {soak['full_answers_correct']}/"
                     f"{soak['full_answers_checked']} right (`{soak['command']}`).")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def summary_table(fid: dict, cap: dict | None, policies: tuple[str, ...] = ("headkv", "snapkv", "streamingllm")
                  ) -> str:
    """The README's one table: quality kept per budget (KV held) and requests held at once."""
    meta, s = fid["meta"], fid["summary"]
    budgets = meta["budgets"]
    held: dict[str, str] = {}
    note = ""
    if cap:
        cm = cap["meta"]
        top = max(r["max_concurrency"] for r in cap["runs"])
        length = max(r["prompt_tokens"] for r in cap["runs"])
        for r in cap["runs"]:
            if r["max_concurrency"] == top and r["prompt_tokens"] == length:
                held[r["server"]] = f"{r['peak_running']}" + (f" (at {cm['budget']})" if r["server"] != "full" else "")
        note = (f" *Requests held*: peak running requests with {length}-token prompts in the same KV memory "
                f"({cm['kv_memory_tokens']} tokens of this model), {top} sent at once.")
    lines = [
        SUMMARY_BEGIN,
        "| policy | " + " | ".join(f"{b} budget" for b in budgets) + " | requests held |",
        "|---|" + "---|" * (len(budgets) + 1),
        "| full KV | " + " | ".join("100%" for _ in budgets) + f" | {held.get('full', '—')} |",
    ]
    for p in (p for p in policies if p in meta["policies"]):
        cells = [f"{_pct(s['relative_to_full'][p][b])} ({_held(s['kv_kept'][p][b])})" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {held.get(p, '—')} |")
    lines += [
        "",
        f"*Quality kept*: score relative to full KV on {meta['cases']} short-answer cases of "
        f"{meta['prompt_tokens'][0]}–{meta['prompt_tokens'][1]} tokens, each KV head keeping a budget of tokens "
        "given as a share of the prompt (in brackets: the share of the prompt's KV actually held)." + note
        + " Test model (SmolLM2-135M), CPU; every policy, the needle grid and the commands: "
        "[benchmarks and results](docs/benchmarks-and-results.md).",
        SUMMARY_END,
    ]
    return "\n".join(lines)


def update_block(text: str, path: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replace the ``begin ... end`` block of ``path`` (which ``text`` starts and ends with)."""
    body = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(body):
        raise SystemExit(f"{path}: no results markers ({begin} ... {end})")
    path.write_text(pattern.sub(lambda _: text, body))


def blocks() -> dict[Path, tuple[str, str, str]]:
    """Each file's generated block from the committed results: path -> (begin, end, text)."""
    fid = load("fidelity_cpu")
    if fid is None:
        raise SystemExit(f"no {RESULTS / 'fidelity_cpu.json'}: run without --report-only first")
    cap = load("capacity_cpu")
    return {RESULTS_DOC: (BEGIN, END, section(fid, cap, load("soak_cpu"), load(NEEDLES), root="../")),
            README: (SUMMARY_BEGIN, SUMMARY_END, summary_table(fid, cap))}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report-only", action="store_true", help="only rebuild the docs' and README's blocks")
    p.add_argument("--skip-fidelity", action="store_true", help="reuse fidelity_cpu.json")
    a = p.parse_args(argv)
    if not a.report_only:
        from benchmarks import capacity, fidelity

        if not a.skip_fidelity:
            fidelity.main([*MAIN_ARGS, "--out", str(RESULTS / "fidelity_cpu")])
            fidelity.main([*NEEDLES_ARGS, "--out", str(RESULTS / NEEDLES)])
        b97, _ = headkv_budget(load("fidelity_cpu"))
        capacity.main(["--budget", b97, "--out", str(RESULTS / "capacity_cpu")])
    for path, (begin, end, text) in blocks().items():
        update_block(text, path, begin, end)
    print(f"{RESULTS_DOC.relative_to(ROOT)} and README.md results rebuilt from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
