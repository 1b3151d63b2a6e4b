"""One policy's settings against a baseline policy at the same budgets, on one server.

    python benchmarks/sweep.py --policy pod --baseline snapkv --budgets 10% 100% \\
        --settings '{"kv_pod_share": 0}' '{"kv_pod_share": 0.5}' --out benchmarks/results/pod_share_cpu

Runs ``benchmarks/fidelity.py`` (needle cases, ``--kv-params`` for every request) for the
baseline, then for ``--policy`` once per ``--settings`` object (``kv_*`` keys added to the
request's), each over a copy of the first grid so that the full-KV rows are asked once; all on
one ``--kv-policy full`` server. Writes each grid as ``OUT_<i>.{json,md}`` and ``OUT.md``: per
setting and budget the needle score (relative to full KV on the same cases), its ratio to the
baseline's and the prompt KV the server reports held (a share of the full prompt KV).
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
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402


def table(policy: str, baseline: str, settings: list[dict], grids: list[dict], budgets: list[str]) -> str:
    """The markdown table of ``OUT.md``: one row for the baseline, one per setting."""
    base = grids[0]["summary"]
    ref = base["relative_to_full"][baseline]
    lines = ["| setting | " + " | ".join(f"{b}: score / vs {baseline} / KV held" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets),
             f"| {baseline} | " + " | ".join(f"{ref[b]:.0%} / 100% / {base['kv_kept'][baseline][b]:.1%}"
                                             for b in budgets) + " |"]
    for setting, grid in zip(settings, grids[1:]):
        s = grid["summary"]
        cells = []
        for b in budgets:
            sc, kv = s["relative_to_full"][policy][b], s["kv_kept"][policy][b]
            cells.append(f"{sc:.0%} / {sc / ref[b]:.0%} / {kv:.1%}" if ref[b] else f"{sc:.0%} / n/a / {kv:.1%}")
        lines.append(f"| {policy} {json.dumps(setting)} | " + " | ".join(cells) + " |")
    meta = grids[0]["meta"]
    return (f"# {policy} settings vs {baseline} at the same budgets\n\nMachine: {meta['machine']}. "
            f"Model: SmolLM2-135M-Instruct (float32, torch_native), greedy.\n"
            f"{meta['cases']} needle cases, prompts of {meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} "
            f"tokens; full KV scores {base['tasks']['niah']['full']:.0%} of the planted answers. Score: "
            f"relative to full KV on the same cases; KV held: the prompt KV the server reports, as a share of "
            f"full (page rounding included).\n\nCommand: `python benchmarks/sweep.py {shlex.join(sys.argv[1:])}`\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, choices=fidelity.POLICIES)
    p.add_argument("--baseline", default="snapkv", choices=fidelity.POLICIES)
    p.add_argument("--settings", nargs="+", type=json.loads, required=True,
                   help="JSON objects of kv_* request keys, one run of --policy each")
    p.add_argument("--out", required=True)
    p.add_argument("--budgets", nargs="+", default=["5%", "10%"])
    p.add_argument("--niah-lengths", nargs="+", default=["1000", "2000", "4000"])
    p.add_argument("--depths", nargs="+", default=["0.1", "0.3", "0.5", "0.7", "0.9"])
    p.add_argument("--kv-params", type=json.loads, default={"kv_scoring": "question"})
    p.add_argument("--concurrency", default="4")
    p.add_argument("--server", default=None, help="an existing --kv-policy server's URL (default: start one)")
    p.add_argument("--jobs", type=int, default=1,
                   help="settings measured at once after the baseline (their requests batch on the server)")
    a = p.parse_args(argv)
    if any(not isinstance(s, dict) or not all(str(k).startswith("kv_") for k in s) for s in a.settings):
        p.error("--settings: each one a JSON object of kv_* keys")
    common = ["--tasks", "niah", "--budgets", *a.budgets, "--niah-lengths", *a.niah_lengths, "--depths", *a.depths,
              "--concurrency", a.concurrency, "--no-progress", "--no-plots"]
    t0 = time.time()
    srv = (None if a.server else
           SGLangServer(models.model_dir(), fidelity.SERVER_ARGS, log_path=f"{a.out}.server.log").start())
    url = a.server or srv.url
    grids: list[dict] = []
    try:
        first = f"{a.out}_{a.baseline}"
        fidelity.main([*common, "--server", url, "--policies", a.baseline, "--extend",  # a finished one is reused
                       "--kv-params", json.dumps(a.kv_params), "--out", first])
        grids.append(json.loads(Path(f"{first}.json").read_text()))

        def run(i: int) -> dict:
            out = f"{a.out}_{i}"
            shutil.copy(f"{first}.json", f"{out}.json")  # its full-KV rows are reused (--extend)
            fidelity.main([*common, "--server", url, "--policies", a.policy, "--extend",
                           "--kv-params", json.dumps({**a.kv_params, **a.settings[i]}), "--out", out])
            return json.loads(Path(f"{out}.json").read_text())

        if a.jobs > 1:  # the full-KV prompts are in the radix cache by now: the settings' requests batch
            with ThreadPoolExecutor(max_workers=a.jobs) as pool:
                grids.extend(pool.map(run, range(len(a.settings))))
        else:
            for i in range(len(a.settings)):
                grids.append(run(i))
                Path(f"{a.out}.md").write_text(table(a.policy, a.baseline, a.settings[:i + 1], grids, a.budgets))
    finally:
        if srv is not None:
            srv.stop()
    md = table(a.policy, a.baseline, a.settings, grids, a.budgets) + f"\nWall time: {round(time.time() - t0)} s.\n"
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
