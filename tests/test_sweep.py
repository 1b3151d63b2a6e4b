"""benchmarks/sweep.py: its table from finished fidelity grids, and its argument checks (no server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sweep import table  # noqa: E402


def grid(policy: str, scores: dict[str, float], kv: dict[str, float]) -> dict:
    return {"summary": {"relative_to_full": {policy: scores}, "kv_kept": {policy: kv},
                        "tasks": {"niah": {"full": 0.9}}},
            "meta": {"machine": "test box", "cases": 10, "prompt_tokens": [1012, 2034]}}


def test_table_puts_each_setting_next_to_the_baseline():
    budgets = ["5%", "10%"]
    base = grid("snapkv", {"5%": 0.5, "10%": 0.8}, {"5%": 0.056, "10%": 0.104})
    a = grid("d2o", {"5%": 0.0, "10%": 0.4}, {"5%": 0.054, "10%": 0.104})
    b = grid("d2o", {"5%": 0.6, "10%": 0.8}, {"5%": 0.055, "10%": 0.105})
    md = table("d2o", "snapkv", [{}, {"kv_d2o_merge": "off"}], [base, a, b], budgets)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1] == "| snapkv | 50% / 100% / 5.6% | 80% / 100% / 10.4% |"
    assert rows[2] == "| d2o {} | 0% / 0% / 5.4% | 40% / 50% / 10.4% |"
    assert rows[3] == '| d2o {"kv_d2o_merge": "off"} | 60% / 120% / 5.5% | 80% / 100% / 10.5% |'
    assert "10 needle cases, prompts of 1012-2034 tokens; full KV scores 90%" in md
    zero = grid("snapkv", {"5%": 0.0, "10%": 0.8}, {"5%": 0.05, "10%": 0.1})
    assert "| d2o {} | 0% / n/a / 5.4% |" in table("d2o", "snapkv", [{}], [zero, a], budgets)


@pytest.mark.parametrize("args, message", [
    (["--policy", "d2o", "--out", "x", "--settings", "[1]"], "each one a JSON object of kv_* keys"),
    (["--policy", "d2o", "--out", "x", "--settings", '{"d2o_merge": "off"}'], "each one a JSON object of kv_* keys"),
    (["--policy", "nope", "--out", "x", "--settings", "{}"], "invalid choice: 'nope'"),
])
def test_bad_arguments_are_named(args, message):
    r = subprocess.run([sys.executable, "benchmarks/sweep.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
