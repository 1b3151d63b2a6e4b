"""Needle-in-a-haystack accuracy per policy at a fixed budget, through the real server.

    python benchmarks/niah.py --cases 20 --budget 128 --out benchmarks/results/niah_cpu

One server (``--kv-policy full``), every policy chosen per request via ``custom_params``.
The radix cache is flushed before each request so that every policy sees a cold prefill
(a full prefix hit would recompute only the last token and shrink the observation
window). Writes ``OUT.json`` (every case's output) and ``OUT.md`` (the table, with the
machine described).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.haystack import needle_prompt  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

POLICIES = ["full", "headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor"]


def machine() -> str:
    import torch

    return (f"{platform.machine()} CPU x{os.cpu_count()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, no GPU")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--window", type=int, default=None, help="--kv-window for every policy (default: server's)")
    p.add_argument("--words", type=int, nargs="+", default=[1400, 1800, 2400],
                   help="haystack sizes in words (~1.5 tokens per word)")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--main-policies", nargs="+", default=["full", "headkv"],
                   help="policies run on every case; the others on the first --cases-others cases")
    p.add_argument("--cases-others", type=int, default=None, help="cases for the other policies (default: all)")
    p.add_argument("--kv-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra custom_params for the compressed policies, e.g. kv_kernel_size=13")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/niah_cpu"))
    args = p.parse_args(argv)

    extra = {}
    for item in args.kv_param:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    cases = []
    for i in range(args.cases):
        words = args.words[i % len(args.words)]
        depth = round((i * 0.37) % 1.0, 2)
        cases.append(needle_prompt(words, depth=depth, seed=1000 + i))

    server_args = ["--kv-policy", "full", "--max-total-tokens", "65536", "--enable-cache-report", "--sleep-on-idle"]
    if args.window:
        server_args += ["--kv-window", str(args.window)]
    results = []
    t0 = time.time()
    with SGLangServer(models.fetch(), server_args, log_path=f"{args.out}.server.log") as srv:
        from openai import OpenAI

        client = OpenAI(base_url=srv.openai_base_url, api_key="none", timeout=900)
        bar = tqdm(total=len(cases) * len(args.policies), desc="niah", unit="req")
        others = args.cases if args.cases_others is None else args.cases_others
        todo = [(ci, pol) for ci in range(len(cases)) for pol in args.policies
                if pol in args.main_policies or ci < others]
        bar.total = len(todo)
        for ci, pol in todo:
            case = cases[ci]
            if True:
                urllib.request.urlopen(urllib.request.Request(f"{srv.url}/flush_cache", method="POST"), timeout=60).read()
                kv = {"kv_policy": pol, "kv_budget": args.budget, **(extra if pol != "full" else {})}
                r = client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": case.prompt}], max_tokens=16,
                    temperature=0, extra_body={"custom_params": kv},
                )
                out = r.choices[0].message.content
                results.append({
                    "case": ci, "policy": pol, "budget": args.budget, "words": case.words, "depth": case.depth,
                    "prompt_tokens": r.usage.prompt_tokens, "answer": case.answer, "output": out,
                    "correct": case.answer in out,
                })
                bar.update(1)
                bar.set_postfix(policy=pol, ok=sum(x["correct"] for x in results if x["policy"] == pol))
        bar.close()
        state = srv.plugin_state()
    wall = time.time() - t0

    acc = {pol: sum(r["correct"] for r in results if r["policy"] == pol) for pol in args.policies}
    n_cases = {pol: sum(1 for r in results if r["policy"] == pol) for pol in args.policies}
    # relative accuracy against full KV on the same cases
    full_on = {pol: sum(r["correct"] for r in results if r["policy"] == "full" and r["case"] < n_cases[pol])
               for pol in args.policies}
    toks = [r["prompt_tokens"] for r in results]
    summary = {
        "machine": machine(), "budget": args.budget, "window": args.window, "kv_params": extra, "cases": len(cases),
        "prompt_tokens": [min(toks), max(toks)], "accuracy": acc, "cases_per_policy": n_cases, "wall_s": round(wall),
        "kv_kept_fraction": {k: v.get("kept_fraction") for k, v in state["policies"].items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    lines = [
        f"# Needle in a haystack, budget {args.budget} tokens per KV head",
        "",
        f"Machine: {summary['machine']}. Model: SmolLM2-135M-Instruct (float32, torch_native).",
        f"{len(cases)} cases, prompts of {min(toks)}–{max(toks)} tokens, needle depths spread over 0–1; "
        f"greedy, 16 new tokens; radix cache flushed before every request; {wall/60:.0f} min.",
        f"Command: `python benchmarks/niah.py --cases {args.cases} --budget {args.budget}"
        + (f" --cases-others {args.cases_others}" if args.cases_others is not None else "")
        + (f" --window {args.window}" if args.window else "")
        + "".join(f" --kv-param {x}" for x in args.kv_param) + "`",
        "",
        "| policy | cases | correct | accuracy | full KV on the same cases | relative to full KV |",
        "|---|---|---|---|---|---|",
    ]
    for pol in args.policies:
        n = n_cases[pol]
        rel = f"{100 * acc[pol] / full_on[pol]:.0f}%" if full_on[pol] else "n/a"
        lines.append(f"| {pol} | {n} | {acc[pol]}/{n} | {100 * acc[pol] / max(n, 1):.0f}% | {full_on[pol]}/{n} | {rel} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
