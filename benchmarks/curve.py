"""A savings/quality curve: one setting of a policy grown step by step, next to a baseline at the same KV.

    python benchmarks/curve.py --policy pod --setting kv_pod_share --values 0 0.1 0.3 0.5 \\
        --budgets 10% 100% --baseline snapkv --out benchmarks/results/pod_curve_cpu

For each budget and value, ``benchmarks/fidelity.py`` asks the needle cases of ``--policy`` with
``{SETTING: value}`` added to every request (``--kv-params``), and reads the prompt KV the server
reports held (a share of the full prompt KV). The baseline is then asked at budgets equal to
those held shares (``"8.7%"`` for a row holding 8.7%), so each row compares the two policies at
(about) the same memory: the baseline's own held share is shown beside it (page rounding makes
it hold a little more than its budget). All grids share one journal of full-KV rows (each case's
full request is asked once) and run on one ``--kv-policy full`` server (``--server URL`` reuses a
running one). ``--seed-grid FILE.json`` copies a finished grid of the same cases (its full rows,
and its baseline rows when measured under this checkout's defaults) instead of asking them again.
Writes ``OUT.json`` (one row per budget and value) and ``OUT.md``; the grids as ``OUT_grids/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import fidelity  # noqa: E402
from benchmarks.niah import machine  # noqa: E402


def held_label(held: float) -> str:
    """A held share of the KV (0.087) as a ratio budget (``"8.7%"``), at least 0.1%."""
    return f"{max(round(100 * held, 1), 0.1):g}%"


def curve_rows(policy: str, baseline: str, setting: str, values: list, budgets: list[str],
               grids: dict, base: dict) -> list[dict]:
    """One row per (budget, value) from the policy's grids (``grids[value]``) and the baseline's grid
    (``base``, holding the matched budgets): scores relative to full KV, KV held, KV saved."""
    rows = []
    values = [v for v in values if v in grids]  # --report-only leaves out a value that finished no case
    for b in budgets:
        ref = grids[values[0]]["summary"]["kv_kept"][policy][b]  # the first value (the least shared)
        for v in values:
            s = grids[v]["summary"]
            held = s["kv_kept"][policy][b]
            lab = held_label(held)
            bs = base["summary"]
            have = {k: v for k, v in bs["kv_kept"][baseline].items() if v is not None}
            if lab not in have and have:  # not asked at that budget (--report-only): the closest held
                lab = min(have, key=lambda k: abs(have[k] - held))
            rows.append({
                "budget": b, setting: v, "held": held, "saved": 1 - held,
                "saved_vs_first": (1 - held / ref) if ref else None,
                "score": s["relative_to_full"][policy][b],
                "baseline_budget": lab, "baseline_held": bs["kv_kept"][baseline].get(lab),
                "baseline_score": bs["relative_to_full"][baseline].get(lab),
            })
    return rows


def journal_grids(gdir: Path, policy: str, baseline: str, setting: str, values: list, budgets: list[str],
                  seed: dict) -> tuple[dict, dict, int]:
    """``--report-only``: the grids as far as they got (finished ``OUT.json`` rows or the journal
    ``OUT.partial.jsonl``), restricted to the cases every value finished at every budget; the
    baseline from ``seed`` (a finished grid of the same cases) on those cases. Returns
    ``(grids by value, baseline grid, cases)``."""
    def rows(name: str, value) -> list[dict]:
        journal = gdir / f"{name}.partial.jsonl"
        if journal.exists():
            return [json.loads(line)["row"] for line in journal.read_text().splitlines() if line.strip()]
        path = gdir / f"{name}.json"
        grid = json.loads(path.read_text()) if path.exists() else {}
        if grid.get("meta", {}).get("kv_params", {}).get(setting) != value:  # a copy made before its run
            return []
        return grid["rows"]

    def case(r: dict) -> tuple:
        return r["task"], r["target_tokens"], r["depth"]

    per = {v: [r for r in rows(f"{policy}_{i}", v) if r["policy"] == policy] for i, v in enumerate(values)}
    full = {case(r): r for r in seed["rows"] if r["policy"] == "full"}
    finished = {v: {c for c in full if {r["budget"] for r in rs if case(r) == c} >= set(budgets)}
                for v, rs in per.items()}
    per = {v: rs for v, rs in per.items() if finished[v]}  # a value that finished no case is left out
    done = set(full)
    for v in per:
        done &= finished[v]
    fulls = [full[c] for c in sorted(done)]
    grids = {v: {"summary": fidelity.summarize(fulls + [r for r in rs if case(r) in done], [policy], budgets, ["niah"])}
             for v, rs in per.items()}
    base_budgets = sorted({r["budget"] for r in seed["rows"] if r["policy"] == baseline}, key=lambda b: float(b[:-1]))
    base_rows = [r for r in seed["rows"] if r["policy"] == baseline and case(r) in done]
    base = {"summary": fidelity.summarize(fulls + base_rows, [baseline], base_budgets, ["niah"]),
            "meta": {**seed["meta"], "cases": len(done),
                     "prompt_tokens": [min(r["prompt_tokens"] for r in fulls), max(r["prompt_tokens"] for r in fulls)]
                     if fulls else [0, 0]}}
    return grids, base, len(done)


def markdown(policy: str, baseline: str, setting: str, rows: list[dict], meta: dict) -> str:
    lines = [f"# {policy}: KV saved vs needle score as `{setting}` grows, next to {baseline} at the same KV", "",
             f"Machine: {meta['machine']}. Model: SmolLM2-135M-Instruct (float32, torch_native), greedy.  ",
             f"{meta['cases']} needle cases (niah), prompts of {meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} "
             f"tokens, `--kv-params {json.dumps(meta['kv_params'])}`; full KV scores {meta['full_score']:.0%} of the "
             f"planted answers. Score: relative to full KV on the same cases. Held: the prompt KV the server "
             f"reports, as a share of the full prompt KV (page rounding included); saved = 1 - held; "
             f"\"vs {setting}={meta['values'][0]}\": the KV saved relative to the first value at the same budget. " +
             (f"{baseline}: its rows in `--seed-grid` on the same cases, at the budget whose held KV is the closest "
              f"to {policy}'s (`--report-only`: the grids as far as they got, the cases every listed value finished; "
              f"a value with no finished case is left out).  " if meta.get("report_only") else
              f"{baseline} is asked at a budget equal to {policy}'s held share.  "),
             f"Command: `{meta['command']}` ({meta['wall_s']} s)", "",
             f"| budget | {setting} | {policy} held | saved | saved vs {setting}={meta['values'][0]} | {policy} score "
             f"| {baseline} budget | {baseline} held | {baseline} score |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        lines.append(f"| {r['budget']} | {r[setting]} | {pct(r['held'])} | {pct(r['saved'])} | "
                     f"{pct(r['saved_vs_first'])} | {pct(r['score'])} | {r['baseline_budget']} | "
                     f"{pct(r['baseline_held'])} | {pct(r['baseline_score'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="pod", choices=fidelity.POLICIES)
    p.add_argument("--setting", default="kv_pod_share", help="the kv_* request key grown")
    p.add_argument("--values", nargs="+", type=json.loads, default=[0, 0.1, 0.3, 0.5])
    p.add_argument("--baseline", default="snapkv", choices=fidelity.POLICIES)
    p.add_argument("--budgets", nargs="+", default=["10%", "100%"])
    p.add_argument("--niah-lengths", nargs="+", default=["1000", "2000", "4000"])
    p.add_argument("--depths", nargs="+", default=["0.1", "0.3", "0.5", "0.7", "0.9"])
    p.add_argument("--kv-params", type=json.loads, default={"kv_scoring": "question"})
    p.add_argument("--concurrency", default="4")
    p.add_argument("--seed-grid", default=None, help="a finished fidelity OUT.json of the same cases to start from")
    p.add_argument("--server", default=None, help="an existing --kv-policy server's URL (default: start one)")
    p.add_argument("--jobs", type=int, default=3, help="values measured at once after the first")
    p.add_argument("--out", required=True)
    p.add_argument("--report-only", action="store_true",
                   help="ask nothing: the table from the grids as far as they got (the cases every value "
                        "finished), the baseline from --seed-grid at its own budgets, the closest held KV")
    a = p.parse_args(argv)
    if not a.setting.startswith("kv_") or a.setting in ("kv_policy", "kv_budget"):
        p.error("--setting: a kv_* request key other than kv_policy and kv_budget")
    for b in a.budgets:
        if not b.endswith("%"):
            p.error("--budgets: shares of the prompt (5%), so that held shares compare across cases")
    common = ["--tasks", "niah", "--niah-lengths", *a.niah_lengths, "--depths", *a.depths,
              "--concurrency", a.concurrency, "--no-progress", "--no-plots"]
    out = Path(a.out)
    gdir = Path(f"{a.out}_grids")
    gdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.report_only:
        if not a.seed_grid:
            p.error("--report-only needs --seed-grid (the full-KV and baseline rows)")
        grids, base, n = journal_grids(gdir, a.policy, a.baseline, a.setting, a.values, a.budgets,
                                       json.loads(Path(a.seed_grid).read_text()))
        return report(a, argv, grids, base, gdir, t0)
    srv = None
    if a.server is None:
        from headkv_sglang.dev import models
        from headkv_sglang.dev.server import SGLangServer

        srv = SGLangServer(models.model_dir(), fidelity.SERVER_ARGS, log_path=f"{a.out}.server.log").start()
    url = a.server or srv.url
    try:
        first = gdir / f"{a.baseline}"
        if a.seed_grid and not Path(f"{first}.json").exists():
            shutil.copy(a.seed_grid, f"{first}.json")

        def run(i: int) -> dict:
            g = gdir / f"{a.policy}_{i}"
            if Path(f"{first}.json").exists() and not Path(f"{g}.json").exists():
                shutil.copy(f"{first}.json", f"{g}.json")  # its full-KV rows are reused (--extend)
            fidelity.main([*common, "--server", url, "--policies", a.policy, "--budgets", *a.budgets, "--extend",
                           "--kv-params", json.dumps({**a.kv_params, a.setting: a.values[i]}), "--out", str(g)])
            return json.loads(Path(f"{g}.json").read_text())

        grids = {}
        if not Path(f"{first}.json").exists():  # the first alone: it asks the full-KV rows the others reuse
            grids[a.values[0]] = run(0)
            shutil.copy(gdir / f"{a.policy}_0.json", f"{first}.json")
        rest = [i for i in range(len(a.values)) if a.values[i] not in grids]
        from transformers import AutoTokenizer  # noqa: F401  # once before the threads: two first imports raced

        with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # their requests batch on the server
            for i, grid in zip(rest, pool.map(run, rest)):
                grids[a.values[i]] = grid
        matched = sorted({held_label(grids[v]["summary"]["kv_kept"][a.policy][b]) for v in a.values
                          for b in a.budgets}, key=lambda s: float(s[:-1]))
        fidelity.main([*common, "--server", url, "--policies", a.baseline, "--budgets", *matched, "--extend",
                       "--concurrency", str(2 * int(a.concurrency)),
                       "--kv-params", json.dumps(a.kv_params), "--out", str(first)])
        base = json.loads(Path(f"{first}.json").read_text())
    finally:
        if srv is not None:
            srv.stop()
    return report(a, argv, grids, base, gdir, t0)


def report(a: argparse.Namespace, argv: list[str] | None, grids: dict, base: dict, gdir: Path, t0: float) -> int:
    """Writes ``OUT.json`` and ``OUT.md`` from the value grids and the baseline grid."""
    out = Path(a.out)
    rows = curve_rows(a.policy, a.baseline, a.setting, a.values, a.budgets, grids, base)
    bm = base["meta"]
    meta = {"machine": machine(), "command": "python benchmarks/curve.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "cases": bm["cases"], "prompt_tokens": bm["prompt_tokens"],
        "kv_params": a.kv_params, "values": a.values, "wall_s": round(time.time() - t0),
        "full_score": base["summary"]["tasks"]["niah"]["full"], "policy": a.policy, "baseline": a.baseline,
        "report_only": a.report_only,
        "setting": a.setting, "budgets": a.budgets, "grids": str(gdir)}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(a.policy, a.baseline, a.setting, rows, meta)
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
