"""Quality kept per policy and budget, through the real server: accuracy vs budget, NIAH heatmaps.

    python benchmarks/fidelity.py --out benchmarks/results/fidelity_cpu          # the full grid
    python benchmarks/fidelity.py --server http://127.0.0.1:30000 --tasks niah --budgets 5% 128

One server (``--kv-policy full``); every (policy, budget) is chosen per request through
``custom_params``. For each generated case (``benchmarks/tasks.py``: needle-in-a-haystack
over length x depth, multi-key needles with same-shaped distractors, multi-value,
variable tracking, common-word extraction, summaries) the full-KV request runs first; it
also leaves the prompt in the radix cache, so the compressed requests that follow prefill
only their last W tokens (the observation window; SGLang's radix matches are capped so
that these are always recomputed, which makes a prefix hit answer exactly like a cold
cache). Budgets are tokens kept per KV head: ``5%`` means 5% of that prompt's tokens,
``128`` an absolute number.

Scores: short answers against the planted truth (share of the expected items in the
output) and exact agreement with the full-KV output; summaries by ROUGE-L F1 against the
full-KV summary. "Relative to full" pools the short-answer tasks: the policy's total
score over full's total score on the same cases. Greedy decoding throughout.

Resumable and extensible: each finished case's requests are appended to ``OUT.partial.jsonl``,
one line per request, keyed by the case's prompt, the policy, the budget and the other kv_*
keys; a run killed part-way and started again asks only the requests not in it, so the grid
can be run in parts (``--fresh`` starts over). ``--extend`` also reuses the rows of a finished
``OUT.json`` (the same code), so a run with more policies, budgets or cases asks only the new
ones; ``--redo POLICY`` asks a policy's rows again after its code changed. Without
``--extend`` a finished grid is measured anew. Writes ``OUT.json`` (every request's output and score, the per-request KV the server
reports, the machine), ``OUT.md`` (tables), ``OUT_accuracy.png`` (accuracy vs budget per
task) and ``OUT_niah_<policy>.png`` (length x depth heatmaps, one panel per budget).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.niah import machine  # noqa: E402
from benchmarks.tasks import TASKS, Case, build, rouge_l, score  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

POLICIES = ["headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor", "d2o", "pod"]
SERVER_ARGS = ["--kv-policy", "full", "--max-total-tokens", "65536", "--enable-cache-report", "--sleep-on-idle"]
MIN_BUDGET = 8  # StreamingLLM/Razor need more than their 4 sinks; 8 leaves a few recent tokens


def parse_budget(text: str) -> tuple[str, float]:
    """``"5%"`` -> ("pct", 5.0); ``"128"`` -> ("abs", 128)."""
    try:
        if text.endswith("%"):
            v = float(text[:-1])
            if not 0 < v <= 100:
                raise ValueError
            return "pct", v
        v = int(text)
        if v < MIN_BUDGET:
            raise ValueError
        return "abs", v
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid budget {text!r}: a percentage of the prompt in (0, 100] like 5%, "
            f"or tokens per KV head >= {MIN_BUDGET} like 128") from None


def budget_tokens(budget: str, prompt_tokens: int) -> int:
    kind, v = parse_budget(budget)
    return int(v) if kind == "abs" else max(MIN_BUDGET, round(v / 100 * prompt_tokens))


def make_cases(tasks: list[str], lengths: list[int], niah_lengths: list[int], depths: list[float],
               seeds: int, count_tokens) -> list[Case]:
    cases = []
    for task in tasks:
        if task == "niah":
            for i, n in enumerate(niah_lengths):
                for j, d in enumerate(depths):
                    cases.append(build("niah", n, seed=100 + 10 * i + j, depth=d, count_tokens=count_tokens))
        else:
            for n in lengths:
                for s in range(seeds):
                    cases.append(build(task, n, seed=200 + s, count_tokens=count_tokens))
    return cases


def chat(url: str, case: Case, params: dict) -> dict:
    body = {"model": "default", "messages": [{"role": "user", "content": case.prompt}],
            "max_tokens": case.max_tokens, "temperature": 0, "custom_params": params}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=1800) as r:
            resp = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code} for {params}: {e.read().decode(errors='replace')[:500]}") from None
    usage = resp.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {"rid": resp["id"], "output": resp["choices"][0]["message"]["content"] or "",
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": details.get("cached_tokens"),
            "seconds": round(time.perf_counter() - t0, 3)}


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def request_key(case: Case, params: dict) -> str:
    """What identifies one request's row in a journal: the case's prompt and what was asked of it
    (policy, budget as given, every other ``kv_*`` key). Independent of the rest of the grid, so
    adding a policy, a budget or a case to a finished grid asks only the new requests."""
    blob = json.dumps([case.task, case.prompt, case.max_tokens, params], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def policy_defaults() -> dict:
    """The settings a compressed request takes from this checkout for every ``kv_*`` key it does not
    send: the policy hyperparameters' defaults (``headkv_sglang/policies/defaults.py``) and the
    automatic window and question lengths. Recorded in ``OUT.json``'s meta and with every journal
    line: compressed rows measured under other defaults are asked again, not reused."""
    from headkv_sglang import config
    from headkv_sglang.policies import defaults

    out = {k.lower(): v for k, v in vars(defaults).items() if k.isupper() and not isinstance(v, tuple)}
    # the grids' prompts hold their question (none is a document shared before it): what the
    # default scoring resolves to for them
    scoring = config.KVPolicyConfig(scoring=config.DEFAULT_SCORING).resolve_scoring(document=False).scoring
    return {**out, "scoring": scoring, "auto_window": config.AUTO_WINDOW,
            "auto_question": config.AUTO_QUESTION}


#: Settings added after grids were recorded, with the value that reproduces what those grids
#: measured (a grid without the key measured exactly this): PoD shared scores between pairs of
#: layers, picked by share, before ``pod_sharing``, ``pod_group`` and ``pod_threshold`` existed.
BEFORE_THE_SETTING = {"pod_group": 2, "pod_sharing": "scores", "pod_threshold": 0.0}


def recorded_defaults(then: dict | None) -> dict | None:
    """A grid's (or journal line's) recorded defaults, with :data:`BEFORE_THE_SETTING` for the
    settings it predates."""
    return None if then is None else {**{k: v for k, v in BEFORE_THE_SETTING.items() if k not in then}, **then}


#: The policies a policy default changes, by its name's prefix; any other default (the window,
#: the pooling, the scoring...) changes every policy's kept tokens.
DEFAULT_OWNERS = {"d2o_": ("d2o",), "pod_": ("pod",), "razor_": ("razor",), "headkv_": ("headkv",),
                  "pyramid_": ("pyramidkv",), "floor_alpha": ("adakv",), "sink_size": ("streamingllm", "razor", "pod")}


def default_affects(name: str, policies) -> bool:
    """Whether the policy default ``name`` changes what any of ``policies`` keeps (None: any policy)."""
    if policies is None:
        return True
    for prefix, owners in DEFAULT_OWNERS.items():
        if name.startswith(prefix):
            return any(p in owners for p in policies)
    return True


def read_journal(path: Path | None) -> dict[str, dict]:
    """The rows a killed run finished, by request key (a torn last line is ignored); compressed rows
    only if they were measured under this checkout's defaults of their policy (full KV's depend on
    none)."""
    done: dict[str, dict] = {}
    if path is None or not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            policy = entry["row"]["policy"]
            if policy == "full" or not changed_defaults(entry.get("defaults"), policies=[policy]):
                done[entry["key"]] = entry["row"]
        except (ValueError, KeyError, TypeError):
            continue
    return done


def changed_defaults(then: dict | None, kv_params: dict | None = None, policies=None) -> list[str]:
    """The policy defaults that differ between ``then`` (a grid's meta ``kv_defaults``; None: not
    recorded) and this checkout, as ``name then -> now``; ``["not recorded"]`` for None. A default
    the grid's requests set themselves (``kv_params``: ``kv_<name>``) does not count, nor one of
    a policy not among ``policies`` (None: every policy counts)."""
    if then is None:
        return ["not recorded"]
    then = recorded_defaults(then)
    return [f"{k} {json.dumps(then.get(k))} -> {json.dumps(v)}" for k, v in policy_defaults().items()
            if (k not in then or then[k] != v) and f"kv_{k}" not in (kv_params or {})
            and default_affects(k, policies)]


def finished_rows(out_json: Path) -> dict[str, dict]:
    """The rows of a finished grid (``OUT.json``) by request key, to reuse when it is extended; its
    compressed rows only if the grid was measured under this checkout's defaults of their policy."""
    if not out_json.exists():
        return {}
    grid = json.loads(out_json.read_text())
    meta = grid.get("meta", {})
    rows = [r for r in grid.get("rows", []) if r.get("key")]
    policies = sorted({r["policy"] for r in rows if r["policy"] != "full"})
    stale = {p for p in policies if changed_defaults(meta.get("kv_defaults"), meta.get("kv_params"), [p])}
    if stale:
        changed = changed_defaults(meta.get("kv_defaults"), meta.get("kv_params"), sorted(stale))
        print(f"{out_json.name}: policy defaults changed ({', '.join(changed)}): its {', '.join(sorted(stale))} "
              "requests are asked again", file=sys.stderr)
    return {r["key"]: r for r in rows if r["policy"] not in stale}


def run_grid(url: str, cases: list[Case], policies: list[str], budgets: list[str], concurrency: int = 8,
             progress: bool = True, kv_params: dict | None = None, journal: Path | None = None,
             reuse: dict[str, dict] | None = None) -> list[dict]:
    """Every case: full first, then every (policy, budget) concurrently. Returns one row per request.

    ``kv_params``: more ``kv_*`` keys sent with every compressed request (e.g. ``kv_scoring``).
    ``journal``: a JSONL file each finished case's rows are appended to, one line per request;
    requests already in it or in ``reuse`` (same prompt, policy, budget and kv_params) are not
    asked again, so a killed run continues where it stopped and a grid can be extended.
    """
    from tqdm import tqdm

    from headkv_sglang.programs.endpoint import kv_report

    rows: list[dict] = []
    lock = threading.Lock()
    done = {**(reuse or {}), **read_journal(journal)}
    settings = policy_defaults()
    bar = tqdm(total=len(cases) * (1 + len(policies) * len(budgets)), desc="fidelity", unit="req",
               disable=not progress)
    configs = [(p, b) for p in policies for b in budgets]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for ci, case in enumerate(cases):
            base = {"task": case.task, "target_tokens": case.meta["target_tokens"],
                    "depth": case.meta.get("depth"), "answers": case.answers}
            fkey = request_key(case, {"kv_policy": "full"})
            fresh: list[dict] = []
            if fkey in done:
                full_row = {**done[fkey], "case": ci}
            else:
                full = chat(url, case, {"kv_policy": "full"})
                full_row = {"key": fkey, "case": ci, **base, "policy": "full", "budget": "full",
                            "budget_tokens": full["prompt_tokens"], **full, "kv": None, "kept_fraction": 1.0}
                fresh.append(full_row)
            bar.update(1)
            n_prompt = full_row["prompt_tokens"]
            by_cfg: dict[tuple[str, str], dict] = {}
            todo = []
            for pol, b in configs:
                key = request_key(case, {**(kv_params or {}), "kv_policy": pol, "kv_budget": b})
                if key in done:
                    by_cfg[(pol, b)] = {**done[key], "case": ci}
                    bar.update(1)
                else:
                    todo.append((key, pol, b, budget_tokens(b, n_prompt)))

            def one(cfg, case=case, base=base, ci=ci):
                key, pol, b, bt = cfg
                r = chat(url, case, {**(kv_params or {}), "kv_policy": pol, "kv_budget": bt})
                with lock:
                    bar.update(1)
                return {"key": key, "case": ci, **base, "policy": pol, "budget": b, "budget_tokens": bt, **r}

            new = list(pool.map(one, todo))
            reports = kv_report(url, [g["rid"] for g in new]) if new else {}
            for g in new:
                kv = reports.get(g["rid"])
                g["kv"] = kv
                g["kept_fraction"] = (kv["held_bytes"] / kv["full_bytes"]) if kv else (
                    1.0 if g["budget_tokens"] >= n_prompt else None)
                by_cfg[(g["policy"], g["budget"])] = g
            fresh += new
            for g in fresh:
                if case.task == "summary":
                    g["score"] = rouge_l(g["output"], full_row["output"])
                else:
                    g["score"] = score(case, g["output"])
                    g["agrees_with_full"] = _norm(g["output"]) == _norm(full_row["output"])
            rows += [full_row, *(by_cfg[c] for c in configs)]
            if journal is not None and fresh:
                with journal.open("a") as f:
                    f.writelines(json.dumps({"key": g["key"], "row": g, "defaults": settings}) + "\n"
                                 for g in fresh)
            bar.set_postfix(task=case.task, tokens=n_prompt)
    bar.close()
    return rows


def summarize(rows: list[dict], policies: list[str], budgets: list[str], tasks: list[str]) -> dict:
    """Mean score per (task, policy, budget); pooled relative-to-full; agreement; ROUGE-L; KV kept."""
    def sel(**kw):
        return [r for r in rows if all(r[k] == v for k, v in kw.items())]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    out: dict = {"tasks": {}, "relative_to_full": {}, "agreement": {}, "summary_rouge_l": {}, "kv_kept": {}}
    for t in tasks:
        out["tasks"][t] = {"full": mean(r["score"] for r in sel(task=t, policy="full"))}
        for p in policies:
            out["tasks"][t][p] = {b: mean(r["score"] for r in sel(task=t, policy=p, budget=b)) for b in budgets}
    short = [t for t in tasks if t != "summary"]
    full_total = sum(r["score"] for r in rows if r["policy"] == "full" and r["task"] in short)
    out["full_short_answer_total"] = full_total
    for p in policies:
        out["relative_to_full"][p] = {}
        out["agreement"][p] = {}
        out["summary_rouge_l"][p] = {}
        out["kv_kept"][p] = {}
        for b in budgets:
            rs = [r for r in sel(policy=p, budget=b) if r["task"] in short]
            out["relative_to_full"][p][b] = (sum(r["score"] for r in rs) / full_total) if full_total else None
            out["agreement"][p][b] = mean(float(r["agrees_with_full"]) for r in rs)
            out["summary_rouge_l"][p][b] = mean(r["score"] for r in sel(policy=p, budget=b, task="summary"))
            out["kv_kept"][p][b] = mean(r["kept_fraction"] for r in sel(policy=p, budget=b))
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(summary: dict, meta: dict, policies: list[str], budgets: list[str], tasks: list[str]) -> str:
    lines = [
        "# Fidelity: quality kept per policy and KV budget",
        "",
        f"Machine: {meta['machine']}. Model: SmolLM2-135M-Instruct (float32, torch_native), greedy.",
        f"{meta['cases']} generated cases ({', '.join(f'{t}: {n}' for t, n in meta['cases_per_task'].items())}), "
        f"prompts of {meta['prompt_tokens'][0]}–{meta['prompt_tokens'][1]} tokens; {meta['requests']} requests in "
        f"{meta['wall_s'] / 60:.0f} min"
        + (f" ({meta['reused_requests']} of them finished by earlier parts of the run, same code and cases)"
           if meta.get("reused_requests") else "") + ".",
        f"Command: `{meta['command']}`",
        "",
        "Budget = prompt tokens kept per KV head (window and sinks included), as a share of each prompt.",
        "",
        "## Short-answer tasks, relative to full KV (pooled score / full's score on the same cases)",
        "",
        "| policy | " + " | ".join(budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(_pct(summary["relative_to_full"][p][b]) for b in budgets) + " |")
    lines += ["", "## Exact agreement with the full-KV output (short-answer tasks)", "",
              "| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(_pct(summary["agreement"][p][b]) for b in budgets) + " |")
    if "summary" in tasks:
        lines += ["", "## Summaries: ROUGE-L F1 against the full-KV summary", "",
                  "| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for p in policies:
            lines.append(f"| {p} | " + " | ".join(
                "–" if summary["summary_rouge_l"][p][b] is None else f"{summary['summary_rouge_l'][p][b]:.2f}"
                for b in budgets) + " |")
    lines += ["", "## Accuracy per task (mean score against the planted answers)", ""]
    for t in tasks:
        if t == "summary":
            continue
        lines += [f"**{t}** — full KV: {_pct(summary['tasks'][t]['full'])}", "",
                  "| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for p in policies:
            lines.append(f"| {p} | " + " | ".join(_pct(summary["tasks"][t][p][b]) for b in budgets) + " |")
        lines.append("")
    lines += ["## Prompt KV actually held (server-reported, page rounding included)", "",
              "| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(
            "–" if summary["kv_kept"][p][b] is None else f"{100 * summary['kv_kept'][p][b]:.1f}%"
            for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], summary: dict, policies: list[str], budgets: list[str], tasks: list[str],
          out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    x = list(range(len(budgets)))
    panels = [t for t in tasks] + ["relative"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, t in zip(axes[0], panels):
        for p in policies:
            if t == "relative":
                ys = [summary["relative_to_full"][p][b] for b in budgets]
            elif t == "summary":
                ys = [summary["summary_rouge_l"][p][b] for b in budgets]
            else:
                ys = [summary["tasks"][t][p][b] for b in budgets]
            ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", label=p,
                    lw=2.2 if p == "headkv" else 1.2)
        ref = 1.0 if t in ("relative", "summary") else summary["tasks"][t]["full"]
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=1, label="full KV")
        if t == "relative":
            ax.axhline(0.97, color="grey", ls=":", lw=1, label="97% of full")
        ax.set_title({"relative": "short answers, rel. to full", "summary": "summary ROUGE-L vs full"}.get(t, t))
        ax.set_xticks(x, budgets)
        ax.set_xlabel("KV budget (of prompt)")
        ax.set_ylim(-0.03, 1.1 if t != "relative" else max(1.1, ax.get_ylim()[1]))
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = f"{out}_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)

    niah = [r for r in rows if r["task"] == "niah"]
    if niah:
        lengths = sorted({r["target_tokens"] for r in niah})
        depths = sorted({r["depth"] for r in niah})
        for p in ["full", *policies]:
            bs = ["full"] if p == "full" else budgets
            fig, axes = plt.subplots(1, len(bs), figsize=(2.6 * len(bs) + 0.8, 2.9), squeeze=False)
            for ax, b in zip(axes[0], bs):
                grid = np.full((len(depths), len(lengths)), np.nan)
                for r in niah:
                    if r["policy"] == p and r["budget"] == b:
                        grid[depths.index(r["depth"]), lengths.index(r["target_tokens"])] = r["score"]
                im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
                ax.set_xticks(range(len(lengths)), [f"{n // 1000}k" if n % 1000 == 0 else str(n) for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
                ax.set_xlabel("prompt tokens")
                ax.set_title(f"{p} {b}" if p != "full" else "full KV", fontsize=9)
            axes[0][0].set_ylabel("needle depth")
            fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
            path = f"{out}_niah_{p}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES)
    p.add_argument("--budgets", nargs="+", default=["1%", "2%", "5%", "10%", "20%"], type=str,
                   help="per KV head: a share of each prompt (5%%) or tokens (128)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1000, 2000, 4000],
                   help="prompt tokens of the non-NIAH tasks")
    p.add_argument("--niah-lengths", nargs="+", type=int, default=[1000, 2000, 4000])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    p.add_argument("--seeds", type=int, default=1, help="cases per (task, length) for the non-NIAH tasks")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--server", default=None, help="an existing server started with --kv-policy (default: start one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/fidelity_cpu"))
    p.add_argument("--kv-params", type=json.loads, default={},
                   help='more kv_* keys for every compressed request, as JSON: \'{"kv_scoring": "window"}\'')
    p.add_argument("--fresh", action="store_true", help="ignore OUT.partial.jsonl left by an interrupted run")
    p.add_argument("--extend", action="store_true",
                   help="also reuse the rows of a finished OUT.json (same code): ask only the requests it lacks")
    p.add_argument("--redo", nargs="+", default=[], choices=["full", *POLICIES], metavar="POLICY",
                   help="ask these policies' requests again (their code changed); the others are reused")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.fresh and (a.extend or a.redo):
        p.error("--fresh asks every request again: it does not go with --extend or --redo")
    if not isinstance(a.kv_params, dict) or any(not str(k).startswith("kv_") or k in ("kv_policy", "kv_budget")
                                                 for k in a.kv_params):
        p.error("--kv-params: a JSON object of kv_* keys other than kv_policy and kv_budget")
    try:
        for b in a.budgets:
            parse_budget(b)
    except argparse.ArgumentTypeError as e:
        p.error(f"--budgets: {e}")
    if any(not 0 <= d <= 1 for d in a.depths):
        p.error("--depths: each depth must be in [0, 1]")
    if any(n < 64 for n in [*a.lengths, *a.niah_lengths]):
        p.error("--lengths/--niah-lengths: prompts must be at least 64 tokens")

    from transformers import AutoTokenizer

    mdir = models.model_dir()
    tok = AutoTokenizer.from_pretrained(str(mdir))
    cases = make_cases(a.tasks, a.lengths, a.niah_lengths, a.depths, a.seeds, lambda s: len(tok(s).input_ids))
    srv = None
    t0 = time.time()
    try:
        if a.server is None:
            srv = SGLangServer(mdir, SERVER_ARGS, log_path=f"{a.out}.server.log").start()
            url = srv.url
        else:
            url = a.server.rstrip("/")
        journal = Path(f"{a.out}.partial.jsonl")
        journal.parent.mkdir(parents=True, exist_ok=True)
        reuse: dict[str, dict] = {}
        if a.fresh:
            journal.unlink(missing_ok=True)
        else:
            logged = read_journal(journal)
            reuse = {**(finished_rows(Path(f"{a.out}.json")) if a.extend else {}), **logged}
            if a.redo:
                # the journal is rewritten without them, so a second kill does not bring them back
                reuse = {k: r for k, r in reuse.items() if r["policy"] not in a.redo}
                now = policy_defaults()  # the rows read_journal kept were measured under these
                journal.write_text("".join(json.dumps({"key": k, "row": r, "defaults": now}) + "\n"
                                           for k, r in logged.items() if r["policy"] not in a.redo))
            if reuse:
                print(f"reusing {len(reuse)} finished requests from {a.out}.json / {journal.name}"
                      + (f" (asking {', '.join(a.redo)} again)" if a.redo else ""), file=sys.stderr)
        rows = run_grid(url, cases, a.policies, a.budgets, a.concurrency, progress=not a.no_progress,
                        kv_params=a.kv_params, journal=journal, reuse=reuse)
    finally:
        if srv is not None:
            srv.stop()
    wall = time.time() - t0
    summary = summarize(rows, a.policies, a.budgets, a.tasks)
    toks = [r["prompt_tokens"] for r in rows if r["policy"] == "full"]
    meta = {
        "machine": machine(), "command": "python benchmarks/fidelity.py " + shlex.join(
            argv if argv is not None else sys.argv[1:]),
        "server_args": SERVER_ARGS if a.server is None else "external", "cases": len(cases),
        "cases_per_task": {t: sum(c.task == t for c in cases) for t in a.tasks}, "requests": len(rows),
        "prompt_tokens": [min(toks), max(toks)], "wall_s": round(wall),
        "reused_requests": sum(r.get("key") in reuse for r in rows), "policies": a.policies,
        "budgets": a.budgets, "tasks": a.tasks, "kv_params": a.kv_params, "kv_defaults": policy_defaults(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    md = markdown(summary, meta, a.policies, a.budgets, a.tasks)
    if not a.no_plots:
        files = plots(rows, summary, a.policies, a.budgets, a.tasks, a.out)
        md += "\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})" for f in files) + "\n"
    Path(f"{a.out}.md").write_text(md)
    Path(f"{a.out}.partial.jsonl").unlink(missing_ok=True)  # everything is in OUT.json now
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
