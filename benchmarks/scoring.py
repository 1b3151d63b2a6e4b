"""Calibrate a setting on cases the fidelity grid does not use: scoring (``--kv-question``), HeadKV's beta, ...

    python benchmarks/scoring.py --out benchmarks/results/scoring_calibration
    python benchmarks/scoring.py --variants kv_beta=1.005 kv_beta=2 --policies headkv \
        --title "HeadKV beta" --out benchmarks/results/beta_calibration

One server (``--kv-policy full``), calibration cases that are **not** the fidelity grid's
(``benchmarks/tasks.py`` generators with seeds from 900 on; the grid uses 100-299), and
for each (policy, budget) the same requests scored in several ways, chosen per request:

* ``window``: SnapKV's observation window, the last ``min(32, budget/4)`` prompt tokens
  (this project's scoring before question-aware scoring);
* ``question:N``: the last ``N`` tokens of the last user turn, before the chat template's
  tail (``--kv-scoring question --kv-question N``);
* ``KEY=VALUE``: any per-request key (``kv_beta=1.005``; the value is read as JSON when it
  parses, else as a string); several joined by ``,`` (``window,kv_beta=5``).

The kept tail is the same in every scoring variant (``min(32, budget/4)``), and beta only
moves tokens between heads, so those variants hold the same KV: only which tokens are kept
differs (a variant that sets ``kv_window`` or ``kv_budget`` does not; OUT.md shows the KV held). Writes ``OUT.json``, ``OUT.md`` and
``OUT.png`` (accuracy per variant and budget).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fidelity import SERVER_ARGS, policy_defaults, run_grid  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from benchmarks.tasks import build  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

CALIBRATION_SEED = 900  # the fidelity grid's cases use seeds 100-299


def calibration_cases(tasks, lengths, depths, seeds, count_tokens) -> list:
    """The fidelity grid's generators with other seeds: niah over length x depth, the other tasks
    ``seeds`` cases per length."""
    cases = []
    for task in tasks:
        for i, n in enumerate(lengths):
            if task == "niah":
                cases += [build("niah", n, seed=CALIBRATION_SEED + 10 * i + j, depth=d, count_tokens=count_tokens)
                          for j, d in enumerate(depths)]
            else:
                cases += [build(task, n, seed=CALIBRATION_SEED + 10 * i + s, count_tokens=count_tokens)
                          for s in range(seeds)]
    return cases


def variant_params(variant: str) -> dict:
    """``window`` | ``question:N`` | ``kv_KEY=VALUE``, several joined by ``,``."""
    out: dict = {}
    for item in variant.split(","):
        if item == "window":
            out["kv_scoring"] = "window"
            continue
        if "=" in item:
            key, _, text = item.partition("=")
            if not key.startswith("kv_") or not text:
                raise argparse.ArgumentTypeError(f"variant {variant!r}: {item!r} is not kv_KEY=VALUE")
            try:
                out[key] = json.loads(text)
            except json.JSONDecodeError:
                out[key] = text
            continue
        kind, _, n = item.partition(":")
        if kind != "question" or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(
                f"variant {variant!r}: expected 'window', 'question:N' (N >= 1) or 'kv_KEY=VALUE'")
        out.update(kv_scoring="question", kv_question=int(n))
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean score per (variant, policy, budget), and the KV held (share of full)."""
    out: dict = {}
    for r in rows:
        if r["policy"] == "full":
            continue
        key = f'{r["variant"]}|{r["policy"]}|{r["budget"]}'
        cell = out.setdefault(key, {"scores": [], "kept": []})
        cell["scores"].append(r["score"])
        if r.get("kept_fraction") is not None:
            cell["kept"].append(r["kept_fraction"])
    return {k: {"mean": sum(c["scores"]) / len(c["scores"]), "n": len(c["scores"]),
                "kept": sum(c["kept"]) / len(c["kept"]) if c["kept"] else None} for k, c in out.items()}


def markdown(summary: dict, full_mean: float, meta: dict, variants, policies, budgets) -> str:
    lines = [
        f"# {meta.get('title') or 'Scoring calibration: question vs window'}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Cases: {meta['cases']} ({', '.join(f'{k}: {v}' for k, v in meta['cases_per_task'].items())}), "
        f"{meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} prompt tokens, calibration seeds from "
        f"{CALIBRATION_SEED} (not the fidelity grid's); {meta['requests']} requests in {meta['wall_s']} s. "
        f"Full KV scores {full_mean:.2f} on them.",
        "",
        "Mean score (share of the planted answers found), per budget; in brackets the KV held as a share of "
        "full.",
        "",
    ]
    for pol in policies:
        lines += [f"## {pol}", "", "| variant | " + " | ".join(budgets) + " | mean |",
                  "|---|" + "---|" * (len(budgets) + 1)]
        for v in variants:
            cells, means = [], []
            for b in budgets:
                c = summary.get(f"{v}|{pol}|{b}")
                if c is None:
                    cells.append("-")
                    continue
                means.append(c["mean"])
                kept = f" ({100 * c['kept']:.1f}%)" if c["kept"] is not None else ""
                cells.append(f"{c['mean']:.2f}{kept}")
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {sum(means) / max(len(means), 1):.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: dict, variants, policies, budgets, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(policies), figsize=(5 * len(policies), 3.6), squeeze=False)
    for ax, pol in zip(axes[0], policies):
        for v in variants:
            ys = [summary.get(f"{v}|{pol}|{b}", {}).get("mean") for b in budgets]
            ax.plot(budgets, ys, marker="o", label=v, linestyle="--" if v == "window" else "-")
        ax.set_title(pol)
        ax.set_xlabel("budget (share of the prompt per KV head)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean score")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["window", "question:8", "question:16", "question:32",
                                                      "question:64", "question:128"])
    p.add_argument("--policies", nargs="+", default=["headkv", "snapkv"])
    p.add_argument("--budgets", nargs="+", default=["1%", "2%", "5%"])
    p.add_argument("--tasks", nargs="+", default=["niah", "multikey"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1000, 2000, 3000])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    p.add_argument("--seeds", type=int, default=3, help="multikey cases per length")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--server", default=None, help="an existing server started with --kv-policy (default: start one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scoring_calibration"))
    p.add_argument("--title", default=None, help="heading of OUT.md (default: the scoring comparison's)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        params = {v: variant_params(v) for v in a.variants}
    except argparse.ArgumentTypeError as e:
        p.error(f"--variants: {e}")

    from transformers import AutoTokenizer

    mdir = models.model_dir()
    tok = AutoTokenizer.from_pretrained(str(mdir))
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    cases = calibration_cases(a.tasks, a.lengths, a.depths, a.seeds, count)
    srv = None
    t0 = time.time()
    rows: list[dict] = []
    try:
        if a.server is None:
            srv = SGLangServer(mdir, SERVER_ARGS, log_path=f"{a.out}.server.log").start()
            url = srv.url
        else:
            url = a.server.rstrip("/")
        for v in a.variants:
            got = run_grid(url, cases, a.policies, a.budgets, a.concurrency, progress=not a.no_progress,
                           kv_params=params[v])
            rows += [{**r, "variant": v} for r in got]
    finally:
        if srv is not None:
            srv.stop()
    wall = time.time() - t0
    summary = summarize(rows)
    fulls = [r for r in rows if r["policy"] == "full" and r["variant"] == a.variants[0]]
    full_mean = sum(r["score"] for r in fulls) / len(fulls)
    toks = [r["prompt_tokens"] for r in fulls]
    meta = {"machine": machine(), "command": "python benchmarks/scoring.py " + shlex.join(
                argv if argv is not None else sys.argv[1:]),
            "cases": len(cases), "cases_per_task": {t: sum(c.task == t for c in cases) for t in a.tasks},
            "requests": len(rows), "prompt_tokens": [min(toks), max(toks)], "wall_s": round(wall),
            "variants": a.variants, "policies": a.policies, "budgets": a.budgets, "full_mean": full_mean,
            "title": a.title, "kv_defaults": policy_defaults()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    md = markdown(summary, full_mean, meta, a.variants, a.policies, a.budgets)
    plot(summary, a.variants, a.policies, a.budgets, f"{a.out}.png")
    md += f"\n![scoring]({Path(a.out).name}.png)\n"
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
