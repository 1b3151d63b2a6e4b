"""benchmarks/curve.py: its rows and table from finished fidelity grids, and its argument checks (no server)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.curve import curve_rows, held_label, markdown  # noqa: E402


def grid(policy: str, scores: dict[str, float], kv: dict[str, float]) -> dict:
    return {"summary": {"relative_to_full": {policy: scores}, "kv_kept": {policy: kv}}}


def test_held_label_rounds_to_a_tenth_of_a_percent_and_never_reaches_zero():
    assert [held_label(x) for x in (0.08749, 0.0875, 1.0, 0.1, 0.0001, 0.0)] == [
        "8.7%", "8.8%", "100%", "10%", "0.1%", "0.1%"]


def test_rows_put_each_value_next_to_the_baseline_at_its_held_kv():
    rng = random.Random(7)
    values, budgets = [0, 0.1, 0.3, 0.5], ["10%", "100%"]
    held = {v: {"10%": 0.104 - 0.01 * i * rng.random(), "100%": 1.0 - 0.1 * i * rng.random()}
            for i, v in enumerate(values)}
    score = {v: {b: rng.random() for b in budgets} for v in values}
    grids = {v: grid("pod", score[v], held[v]) for v in values}
    labels = {held_label(held[v][b]) for v in values for b in budgets}
    base_held = {lab: float(lab[:-1]) / 100 + 0.004 for lab in labels}
    base_score = {lab: rng.random() for lab in labels}
    rows = curve_rows("pod", "snapkv", "kv_pod_share", values, budgets, grids, grid("snapkv", base_score, base_held))
    assert [(r["budget"], r["kv_pod_share"]) for r in rows] == [(b, v) for b in budgets for v in values]
    for r in rows:  # against the inputs, one by one
        v, b = r["kv_pod_share"], r["budget"]
        lab = held_label(held[v][b])
        assert r["held"] == held[v][b] and r["score"] == score[v][b] and r["saved"] == pytest.approx(1 - held[v][b])
        assert r["saved_vs_first"] == pytest.approx(1 - held[v][b] / held[0][b])
        assert (r["baseline_budget"], r["baseline_held"], r["baseline_score"]) == (lab, base_held[lab], base_score[lab])
    meta = {"machine": "test box", "cases": 10, "prompt_tokens": [1012, 2034], "kv_params": {"kv_scoring": "question"},
            "full_score": 0.9, "values": values, "command": "python benchmarks/curve.py x", "wall_s": 5}
    md = markdown("pod", "snapkv", "kv_pod_share", rows, meta)
    lines = [ln for ln in md.splitlines() if ln.startswith("| 10%") or ln.startswith("| 100%")]
    assert len(lines) == 8 and lines[0].startswith(f"| 10% | 0 | {100 * held[0]['10%']:.1f}% | ")
    assert "10 needle cases (niah), prompts of 1012-2034 tokens" in md and "full KV scores 90%" in md


def test_a_missing_baseline_budget_shows_a_dash():
    rows = curve_rows("pod", "snapkv", "kv_pod_share", [0], ["10%"], {0: grid("pod", {"10%": 0.5}, {"10%": 0.1})},
                      grid("snapkv", {}, {}))
    assert rows[0]["baseline_score"] is None
    md = markdown("pod", "snapkv", "kv_pod_share", rows, {"machine": "m", "cases": 1, "prompt_tokens": [1, 2],
                  "kv_params": {}, "full_score": 1.0, "values": [0], "command": "c", "wall_s": 1})
    assert md.rstrip().endswith("| 10% | – | – |")


@pytest.mark.parametrize("args, message", [
    (["--out", "x", "--setting", "pod_share"], "a kv_* request key other than kv_policy and kv_budget"),
    (["--out", "x", "--setting", "kv_budget"], "a kv_* request key other than kv_policy and kv_budget"),
    (["--out", "x", "--budgets", "128"], "shares of the prompt"),
])
def test_bad_arguments_are_named(args, message):
    r = subprocess.run([sys.executable, "benchmarks/curve.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
