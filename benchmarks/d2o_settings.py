"""D2O's settings against SnapKV at the same held KV, on one server (``benchmarks/fidelity.py`` grids).

    python benchmarks/d2o_settings.py --out benchmarks/results/d2o_settings_cpu

Runs ``fidelity.py --policies d2o snapkv`` with D2O's defaults, then ``--policies d2o`` once per
``MERGE:LAYERS`` setting (``--kv-d2o-merge`` x ``--kv-d2o-layers``) over a copy of that grid, so
the full-KV and SnapKV rows are asked once; all on one ``--kv-policy full`` server. Writes each
grid as ``OUT_<merge>_<layers>.{json,md}`` and ``OUT.md``: D2O's needle score per setting and
budget next to SnapKV's, its ratio to SnapKV's, and the prompt KV each held.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import fidelity  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402
from headkv_sglang.policies import defaults  # noqa: E402

SETTINGS = ["off:profile", "off:uniform", "on:uniform", "on:request", "off:request", "mean:profile"]


def table(out: str, grids: dict[str, dict], budgets: list[str]) -> str:
    """``OUT.md``: one row per setting, the needle score, its ratio to SnapKV's and the KV held."""
    base = grids["default"]["summary"]
    snap = base["relative_to_full"]["snapkv"]
    lines = ["| d2o setting (merge:layers) | " + " | ".join(f"{b}: score / vs snapkv / KV held" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    lines.append("| snapkv | " + " | ".join(
        f"{snap[b]:.0%} / 100% / {base['kv_kept']['snapkv'][b]:.1%}" for b in budgets) + " |")
    for name, grid in grids.items():
        s = grid["summary"]
        cells = []
        for b in budgets:
            sc, kv = s["relative_to_full"]["d2o"][b], s["kv_kept"]["d2o"][b]
            ratio = f"{sc / snap[b]:.0%}" if snap[b] else "n/a"
            cells.append(f"{sc:.0%} / {ratio} / {kv:.1%}")
        label = f"{defaults.D2O_MERGE}:{defaults.D2O_LAYERS} (defaults)" if name == "default" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    meta = grids["default"]["meta"]
    return (f"# D2O settings vs SnapKV at the same budget\n\nMachine: {meta['machine']}\n"
            f"{meta['cases']} cases, prompts of {meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} tokens, "
            f"full KV scores {base['tasks']['niah']['full']:.0%}. Scores are relative to full KV on the same "
            f"cases; KV held = prompt KV the server reports, as a share of full.\n\n"
            f"Command: `python benchmarks/d2o_settings.py {shlex.join(sys.argv[1:])}`\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/d2o_settings_cpu"))
    p.add_argument("--budgets", nargs="+", default=["5%", "10%"])
    p.add_argument("--niah-lengths", nargs="+", default=["1000", "2000", "4000"])
    p.add_argument("--depths", nargs="+", default=["0.1", "0.3", "0.5", "0.7", "0.9"])
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="MERGE:LAYERS pairs besides the defaults")
    p.add_argument("--kv-params", type=json.loads, default={"kv_scoring": "question"})
    p.add_argument("--concurrency", default="4")
    a = p.parse_args(argv)
    for s in a.settings:
        m, _, lay = s.partition(":")
        if m not in defaults.D2O_MERGES or lay not in defaults.D2O_LAYER_CHOICES:
            p.error(f"--settings: {s!r} is not MERGE:LAYERS with MERGE in {defaults.D2O_MERGES} "
                    f"and LAYERS in {defaults.D2O_LAYER_CHOICES}")
    common = ["--tasks", "niah", "--budgets", *a.budgets, "--niah-lengths", *a.niah_lengths, "--depths", *a.depths,
              "--concurrency", a.concurrency, "--no-progress", "--no-plots"]
    t0 = time.time()
    srv = SGLangServer(models.model_dir(), fidelity.SERVER_ARGS, log_path=f"{a.out}.server.log").start()
    grids: dict[str, dict] = {}
    try:
        base = f"{a.out}_default"
        fidelity.main([*common, "--server", srv.url, "--policies", "d2o", "snapkv",
                       "--kv-params", json.dumps(a.kv_params), "--out", base])
        grids["default"] = json.loads(Path(f"{base}.json").read_text())
        for s in a.settings:
            m, _, lay = s.partition(":")
            out = f"{a.out}_{m}_{lay}"
            shutil.copy(f"{base}.json", f"{out}.json")  # its full-KV rows are reused (--extend)
            params = {**a.kv_params, "kv_d2o_merge": m, "kv_d2o_layers": lay}
            fidelity.main([*common, "--server", srv.url, "--policies", "d2o", "--extend",
                           "--kv-params", json.dumps(params), "--out", out])
            grids[s] = json.loads(Path(f"{out}.json").read_text())
            Path(f"{a.out}.md").write_text(table(a.out, grids, a.budgets))  # after each, in case of a kill
    finally:
        srv.stop()
    md = table(a.out, grids, a.budgets) + f"\nWall time: {round(time.time() - t0)} s; {machine()}\n"
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
