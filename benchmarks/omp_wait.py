"""OpenMP's wait policy on a small CPU machine: a torch process alone, and two side by side.

    python benchmarks/omp_wait.py [--seconds 6] [--out benchmarks/results/omp_wait_cpu]

The test suite runs a server's forward next to pytest's own torch work (references on the
test model, benchmark scripts, a second server). With OpenMP's default wait policy, a thread
that waits for its team spins for a while before it sleeps, and two processes whose teams
each want every core then take the cores from each other. ``OMP_WAIT_POLICY=PASSIVE`` makes
waiting threads sleep. This measures a matmul loop at the test model's hidden size (64 tokens
x 576 x 576, 50 per step) and the test model's prefill of 1024 tokens, each alone and as two
processes at once, under both policies (every configuration its own fresh processes, one
after the other, so run it on an otherwise idle machine). Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = r"""
import sys, time, torch
kind, seconds, model = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if kind == "matmul":
    x, w = torch.randn(64, 576), torch.randn(576, 576)
    step = lambda: [x @ w for _ in range(50)]
else:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    ids = torch.randint(100, 20000, (1, 1024))
    torch.set_grad_enabled(False)
    m(ids[:, :64])
    step = lambda: m(ids)
print("ready", flush=True)
sys.stdin.readline()  # every process starts together
t0, n = time.time(), 0
while time.time() - t0 < seconds:
    step()
    n += 1
print(n / (time.time() - t0), flush=True)
"""


def run(kind: str, procs: int, policy: str | None, seconds: float, model: str) -> list[float]:
    """Steps per second of each of ``procs`` processes started together."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    ps = [subprocess.Popen([sys.executable, "-c", WORKER, kind, str(seconds), model], env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
          for _ in range(procs)]
    for p in ps:
        assert p.stdout.readline().strip() == "ready"
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    return [float(p.communicate()[0].strip()) for p in ps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", default="benchmarks/results/omp_wait_cpu")
    a = p.parse_args(argv)
    from benchmarks.niah import machine
    from headkv_sglang.dev import models

    model = str(models.model_dir())
    rows = []
    for kind in ("matmul", "prefill"):
        for policy in (None, "PASSIVE"):
            for procs in (1, 2):
                rates = run(kind, procs, policy, a.seconds, model)
                rows.append({"work": kind, "policy": policy or "default", "processes": procs, "rates": rates})
                print(rows[-1], flush=True)
    alone = {(r["work"], r["policy"]): r["rates"][0] for r in rows if r["processes"] == 1}
    lines = ["# OpenMP wait policy: one torch process alone and two side by side", "",
             f"Machine: {machine()}. Command: `python benchmarks/omp_wait.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "*matmul*: steps of 50 products (64 x 576 by 576 x 576) per second; *prefill*: the test model's "
             "1024-token prefills per second. Two processes: each one's rate (they ran at the same time). "
             "*vs default alone*: the sum of the processes' rates against one process alone with the default "
             "policy.", "",
             "| work | OMP_WAIT_POLICY | processes | rate of each | vs default alone |", "|---|---|---|---|---|"]
    for r in rows:
        base = alone[(r["work"], "default")]
        lines.append(f"| {r['work']} | {r['policy']} | {r['processes']} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['rates'])} | {sum(r['rates']) / base:.2f}x |")
    Path(f"{a.out}.json").write_text(json.dumps({"machine": machine(), "seconds": a.seconds, "rows": rows}, indent=1))
    Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
