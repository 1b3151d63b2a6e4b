"""Where PoD's sharing can hold on a model: how much of each row's own selection the layer below's keeps.

    python benchmarks/pod_overlap.py --out benchmarks/results/pod_overlap_cpu

PoD lets a (layer, KV head) row reuse the row below's attention over its distant tokens: it then
keeps the tokens the row below kept. This measures, without a server, what that costs on the
model: the test model runs each needle case (``benchmarks/tasks.py``, calibration seeds from 900,
not the grid's) once in float32, its post-RoPE queries and keys are captured, and the policy's
own code (``--policies``, snapkv by default; the scoring span the server would use) selects each
row's tokens (``kept_tokens.select``). Per layer ``l >= 1`` and budget it reports, over KV heads
and cases:

* **overlap** (the oracle overlap): of the distant tokens (before the observation window) row
  ``(l, h)`` keeps by its own scores, the share that row ``(l - 1, h)`` keeps too, i.e. what a
  sharing row would still hold of its own choice;
* **answer rows**: rows keeping every token of the planted answer with their own selection, and
  with the row below's (what they would keep sharing);
* the ``pod`` profile's similarity of the layer (mean over its KV heads: what ``kv_pod_share``
  ranks the rows by).

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (overlap by layer, per budget).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kept_tokens import add_case_args, answer_rows, capture_qk, load, render, select  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from benchmarks.scoring import calibration_cases  # noqa: E402


#: What :func:`analyse` counts per layer (summed over cases).
COUNTS = ("own", "common", "answer_own", "answer_below")


def row_overlap(keep: torch.Tensor, below: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(own, common)``, int64 ``[H]``: distant tokens (positions ``< T - window``) each row of the
    bool ``[H, T]`` mask ``keep`` keeps, and how many of them ``below`` (the layer below's mask)
    keeps too."""
    if keep.shape != below.shape or keep.dim() != 2:
        raise ValueError(f"keep and below must be the same [H, T]; got {list(keep.shape)}, {list(below.shape)}")
    distant = torch.arange(keep.shape[1]) < keep.shape[1] - max(window, 0)
    own = keep & distant
    return own.sum(dim=1), (own & below).sum(dim=1)


def overlap_share(x: dict) -> float:
    """A layer's (or a total's) oracle overlap: ``common / own`` (0 when it keeps no distant token)."""
    return x["common"] / max(x["own"], 1)


def analyse(keeps: list[torch.Tensor], spans: list[tuple[int, int]], window: int) -> list[dict]:
    """Per layer ``l >= 1``: distant tokens kept (own), kept by the layer below too (common), rows
    keeping the answer with their own selection and with the layer below's."""
    out = []
    for layer in range(1, len(keeps)):
        own, common = row_overlap(keeps[layer], keeps[layer - 1], window)
        out.append({"layer": layer, "own": int(own.sum()), "common": int(common.sum()),
                    "answer_own": int(answer_rows(keeps[layer], spans).sum()),
                    "answer_below": int(answer_rows(keeps[layer - 1], spans).sum())})
    return out


def markdown(meta: dict, layers: dict, similarity: list[float]) -> str:
    budgets = list(layers)
    rows = meta["rows_per_layer"]
    lines = [f"# PoD's oracle overlap: how much of a row's own selection the layer below keeps ({meta['policy']})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Cases: {meta['cases']} needle prompts of {meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} tokens "
             f"(calibration seeds, not the grid's), {meta['variant']} scoring; {rows} rows per layer (KV heads x "
             f"cases); {meta['wall_s']} s.", "",
             "*overlap*: of the distant tokens (before the observation window) a row keeps by its own scores, the "
             "share the row below (layer - 1, same KV head) keeps too: what a sharing row would still hold of its "
             "own choice. *answer*: rows keeping every token of the planted answer with their own selection / with "
             "the row below's. *similarity*: the `pod` profile's, mean over the layer's KV heads (what "
             "`kv_pod_share` ranks rows by).", "",
             "| layer | similarity | " + " | ".join(f"overlap {b} | answer {b}" for b in budgets) + " |",
             "|---|---|" + "---|---|" * len(budgets)]
    for i, layer in enumerate(layers[budgets[0]]):
        cells = []
        for b in budgets:
            x = layers[b][i]
            cells.append(f"{overlap_share(x):.0%} | {x['answer_own']} / {x['answer_below']}")
        lines.append(f"| {layer['layer']} | {similarity[layer['layer']]:.2f} | " + " | ".join(cells) + " |")
    lines += [""]
    for b in budgets:
        t = {k: sum(x[k] for x in layers[b]) for k in COUNTS}
        lines.append(f"- {b}: overall overlap {overlap_share(t):.0%}; rows keeping the answer {t['answer_own']} "
                     f"with their own selection, {t['answer_below']} with the layer below's.")
    return "\n".join(lines) + "\n"


def plot(layers: dict, similarity: list[float], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for b, xs in layers.items():
        ax.plot([x["layer"] for x in xs], [overlap_share(x) for x in xs], marker="o", label=f"overlap {b}")
    ax.plot(range(1, len(similarity)), similarity[1:], linestyle="--", color="grey", label="pod profile similarity")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title("Distant tokens a row keeps that the layer below keeps too")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_args(p, ["question:16"])
    p.set_defaults(policies=["snapkv"], budgets=["5%", "10%"], tasks=["niah"], lengths=[1000, 2000],
                   depths=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/pod_overlap_cpu"))
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if len(a.variants) != 1 or len(a.policies) != 1:
        p.error("one --variants and one --policies value (the table has a column pair per budget)")
    tok, model, shape, finder, cfgs = load(p, a)
    from tqdm import tqdm

    from headkv_sglang.config import KVPolicyConfig
    from headkv_sglang.policies.budgets import effective_window
    from headkv_sglang.policies.registry import build_policy

    pod = build_policy(KVPolicyConfig(policy="pod").with_request({"kv_budget": "10%"}).for_prompt(1000), shape)
    similarity = [float(x) for x in pod.similarity.mean(dim=1)]
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    cases = calibration_cases(a.tasks, a.lengths, a.depths, a.seeds, count)
    t0 = time.time()
    layers: dict[str, list[dict]] = {}
    toks = []
    for case in tqdm(cases, desc="cases", disable=None):
        _, ids, spans = render(tok, case)
        toks.append(len(ids))
        qs, ks = capture_qk(model, ids)
        for (_, _, b), base in cfgs.items():
            cfg = base.for_prompt(len(ids))
            policy = build_policy(cfg, shape)
            got = analyse(select(policy, cfg, finder, ids, qs, ks), spans,
                          effective_window(policy.window_size, cfg.budget, len(ids)))
            if b not in layers:
                layers[b] = got
                continue
            for s, x in zip(layers[b], got):
                for k in COUNTS:
                    s[k] += x[k]
    meta = {"machine": machine(), "policy": a.policies[0], "variant": a.variants[0], "cases": len(cases),
            "prompt_tokens": [min(toks), max(toks)], "rows_per_layer": shape.num_kv_heads * len(cases),
            "wall_s": round(time.time() - t0),
            "command": "python benchmarks/pod_overlap.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "similarity": similarity, "layers": layers},
                                                indent=1) + "\n")
    md = markdown(meta, layers, similarity)
    Path(f"{a.out}.md").write_text(md)
    if not a.no_plots:
        plot(layers, similarity, a.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
