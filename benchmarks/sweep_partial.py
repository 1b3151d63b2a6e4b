"""A stopped benchmarks/sweep.py (d2o vs snapkv): per setting, d2o and snapkv on the cases that setting
finished (its journal OUT_<i>.partial.jsonl or OUT_<i>.json), and how many outputs equal snapkv's.

    python benchmarks/sweep_partial.py OUT SETTING_JSON...   (the sweep's --out and --settings)

Writes OUT.json and OUT_partial_table.md."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import fidelity
out = sys.argv[1]
settings = [json.loads(s) for s in sys.argv[2:]]
budgets = ["5%", "10%"]
base = json.loads(Path(f"{out}_snapkv.json").read_text())
def case_of(r): return (r["target_tokens"], r["depth"])
res = {"meta": {**base["meta"], "note": "each setting on the cases it finished before the run was stopped"}, "settings": []}
lines = ["| d2o setting | cases | 5%: d2o / snapkv (same cases) / KV held | 10%: d2o / snapkv (same cases) / KV held | outputs identical to snapkv's |", "|---|---|---|---|---|"]
snap = {(case_of(r), r["budget"]): r for r in base["rows"] if r["policy"] == "snapkv"}
for i, st in enumerate(settings):
    jp = Path(f"{out}_{i}.partial.jsonl")
    rows = [json.loads(l)["row"] for l in jp.read_text().splitlines() if l.strip()] if jp.exists() else [r for r in json.loads(Path(f"{out}_{i}.json").read_text())["rows"]]
    rows = [r for r in rows if r["policy"] == "d2o"]
    cs = {}
    for r in rows: cs.setdefault(case_of(r), set()).add(r["budget"])
    done = sorted(c for c, b in cs.items() if set(budgets) <= b)
    full = [r for r in base["rows"] if r["policy"] == "full" and case_of(r) in done]
    d = fidelity.summarize(full + [r for r in rows if case_of(r) in done], ["d2o"], budgets, ["niah"])
    s = fidelity.summarize(full + [snap[(c, b)] for c in done for b in budgets], ["snapkv"], budgets, ["niah"])
    same = sum(r["output"] == snap[(case_of(r), r["budget"])]["output"] for r in rows if case_of(r) in done)
    cells = [f"{d['relative_to_full']['d2o'][b]:.0%} / {s['relative_to_full']['snapkv'][b]:.0%} / {d['kv_kept']['d2o'][b]:.1%}" for b in budgets]
    lines.append(f"| {json.dumps(st)} | {len(done)} | {cells[0]} | {cells[1]} | {same} of {2 * len(done)} |")
    res["settings"].append({"setting": st, "cases": done, "d2o": d, "snapkv_same_cases": s, "identical_outputs": same,
                            "rows": [r for r in rows if case_of(r) in done]})
print("\n".join(lines))
Path(f"{out}.json").write_text(json.dumps(res, indent=1) + "\n")
Path(f"{out}_partial_table.md").write_text("\n".join(lines) + "\n")
