"""Which prompt tokens a policy keeps: the planted answer, the distractors, the question.

    python benchmarks/kept_tokens.py --out benchmarks/results/kept_tokens_cpu

Answers "why does a cell of the fidelity grid fail" without a server: the test model runs
each calibration case (``benchmarks/tasks.py`` generators, seeds from 900 as in
``scoring.py``, not the grid's) once in float32 on the CPU, its post-RoPE queries and keys
are captured, and the policy's own code (``registry.build_policy`` + ``compress_layer``, the
scoring queries the server would use) selects the kept tokens at each budget. Per
(variant, policy, budget) it reports, over all ``L x H`` KV heads of all cases:

* **answer**: heads keeping every token of the planted answer (the needle's number);
* **distractor**: heads keeping every token of at least one other needle's number (multikey);
* **question**: prompt tokens from the question on (the text after the last blank line,
  the chat template's tail included) kept per head, against the tokens kept per head.

A proxy, not a score: the answer must also be read by the heads the model copies with.
Writes ``OUT.json`` and ``OUT.md``.
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

from benchmarks.niah import machine  # noqa: E402
from benchmarks.scoring import calibration_cases, variant_params  # noqa: E402
from headkv_sglang.config import KVPolicyConfig, ModelShape, parse_budget  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.policies.base import compress_layer  # noqa: E402
from headkv_sglang.policies.registry import build_policy  # noqa: E402
from headkv_sglang.question import QuestionFinder  # noqa: E402


def capture_qk(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the post-RoPE queries ``[Hq, T, D]`` and keys ``[Hkv, T, D]`` of one prompt."""
    import transformers.models.llama.modeling_llama as llama

    qs: list[torch.Tensor] = []
    ks: list[torch.Tensor] = []
    original = llama.eager_attention_forward

    def record(module, query, key, value, *args, **kwargs):
        qs.append(query[0].detach().clone())
        ks.append(key[0].detach().clone())
        return original(module, query, key, value, *args, **kwargs)

    llama.eager_attention_forward = record
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        llama.eager_attention_forward = original
    if len(qs) != model.config.num_hidden_layers:
        raise RuntimeError(f"captured {len(qs)} layers of {model.config.num_hidden_layers}: "
                           "the model does not use Llama's eager attention")
    return qs, ks


def token_spans(tok, text: str, needle: str) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of every occurrence of ``needle`` in ``text``."""
    out, at = [], text.find(needle)
    while at >= 0:
        out.append((len(tok.encode(text[:at])), len(tok.encode(text[:at + len(needle)]))))
        at = text.find(needle, at + 1)
    return out


def answer_rows(keep: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """bool ``[H]``: rows of the keep mask ``[H, T]`` holding every token of at least one span."""
    hit = torch.zeros(keep.shape[0], dtype=torch.bool)
    for s, e in spans:
        hit |= keep[:, s:e].all(dim=1)
    return hit


def kept_counts(keep: torch.Tensor, answer: list, distractors: list, question_from: int) -> dict:
    """Counts for one layer's bool keep mask ``[H, T]``."""
    return {"answer": int(answer_rows(keep, answer).sum()), "distractor": int(answer_rows(keep, distractors).sum()),
            "question": int(keep[:, question_from:].sum()), "kept": int(keep.sum())}


def render(tok, case) -> tuple[str, list[int], list[tuple[int, int]]]:
    """A case as the server sees it: the chat text, its token ids, the planted answer's token spans."""
    text = tok.apply_chat_template([{"role": "user", "content": case.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    return text, ids, [sp for a in case.answers for sp in token_spans(tok, text, a)]


def select(policy, cfg: KVPolicyConfig, finder: QuestionFinder, ids: list[int],
           qs: list[torch.Tensor], ks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the bool ``[H, T]`` keep mask ``policy`` chooses (the server's scoring span)."""
    num_layers = len(ks)
    start, end = cfg.scoring_span(finder, ids, len(ids))
    planned = policy.plan_budgets(len(ids), cfg.budget, num_layers, ks[0].shape[0])
    keeps, prev = [], None
    for layer in range(num_layers):
        k = ks[layer]
        prev = compress_layer(policy, layer, qs[layer][:, start:end], k, k, cfg.budget, planned,
                              q_end=end, prev=prev)
        keeps.append(prev.keep)
    return keeps


def analyse(tok, model, shape: ModelShape, finder: QuestionFinder, case, cfgs: dict) -> dict:
    """``{(variant, policy, budget): counts}`` for one case."""
    text, ids, answer = render(tok, case)
    qs, ks = capture_qk(model, ids)
    distractors = [sp for n in case.meta.get("distractors", []) if n not in case.answers
                   for sp in token_spans(tok, text, n)]
    question_from = len(tok.encode(text[:text.rfind("\n\n")], add_special_tokens=False))
    out = {}
    for key, base in cfgs.items():
        cfg = base.for_prompt(len(ids))
        total = {"answer": 0, "distractor": 0, "question": 0, "kept": 0}
        for keep in select(build_policy(cfg, shape), cfg, finder, ids, qs, ks):
            for name, n in kept_counts(keep, answer, distractors, question_from).items():
                total[name] += n
        out[key] = {**total, "budget_tokens": cfg.budget, "prompt_tokens": len(ids)}
    return out


def add_case_args(p: argparse.ArgumentParser, variants: list[str]) -> None:
    """The options this tool and ``headroom.py`` share: what to select with, on which cases."""
    p.add_argument("--variants", nargs="+", default=variants,
                   help="as in scoring.py: window, question:N, kv_KEY=VALUE (joined by ',')")
    p.add_argument("--policies", nargs="+", default=["headkv", "snapkv"])
    p.add_argument("--budgets", nargs="+", default=["2%", "5%"])
    p.add_argument("--tasks", nargs="+", default=["niah", "multikey"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1000, 2000, 3000])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    p.add_argument("--seeds", type=int, default=3, help="cases per length of the tasks other than niah")


def load(p: argparse.ArgumentParser, a: argparse.Namespace):
    """``(tok, model, shape, finder, cfgs)`` for :func:`add_case_args`' options (``p.error`` on bad ones);
    ``cfgs``: ``{(variant, policy, budget): KVPolicyConfig}``."""
    try:
        params = {v: variant_params(v) for v in a.variants}
        for b in a.budgets:
            parse_budget(b, "--budgets")
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    cfgs = {}
    for v in a.variants:
        for pol in a.policies:
            for b in a.budgets:
                try:
                    cfgs[(v, pol, b)] = KVPolicyConfig(policy=pol).with_request({"kv_budget": b, **params[v]})
                except ValueError as e:
                    p.error(f"{v} / {pol} / {b}: {e}")
    from headkv_sglang.profile import load_model

    mdir = models.model_dir()
    tok, model = load_model(str(mdir))
    return tok, model, ModelShape.from_model_path(mdir), QuestionFinder.from_tokenizer(tok), cfgs


def markdown(summary: list[dict], meta: dict) -> str:
    heads = meta["heads_per_case"]
    lines = [f"# {meta['title']}", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Cases: {meta['cases']} ({', '.join(f'{t}: {n}' for t, n in meta['cases_per_task'].items())}), "
             f"{meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} prompt tokens, calibration seeds from 900; "
             f"{heads} KV heads per case; {meta['wall_s']} s.", "",
             "Heads keeping every token of the planted answer / of at least one distractor (multikey: three other "
             "needles' numbers), summed over the task's cases; per head: prompt tokens kept, of which from the "
             "question on (the text after the last blank line, and the template's tail).", "",
             "| task | variant | policy | budget | answer heads | distractor heads | kept / head | question / head |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        n = s["cases"] * heads
        lines.append(f"| {s['task']} | {s['variant']} | {s['policy']} | {s['budget']} | {s['answer']} of {n} | "
                     f"{s['distractor']} of {n} | {s['kept'] / n:.1f} | {s['question'] / n:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_args(p, ["question:16", "question:8"])
    p.add_argument("--title", default="Which tokens are kept")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/kept_tokens_cpu"))
    a = p.parse_args(argv)
    tok, model, shape, finder, cfgs = load(p, a)
    from tqdm import tqdm

    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    cases = calibration_cases(a.tasks, a.lengths, a.depths, a.seeds, count)
    t0 = time.time()
    rows = []
    for case in tqdm(cases, desc="cases", disable=None):
        for (v, pol, b), got in analyse(tok, model, shape, finder, case, cfgs).items():
            rows.append({"task": case.task, "variant": v,
                         "policy": pol, "budget": b, **got})
    summary = []
    for task in a.tasks:
        for (v, pol, b) in cfgs:
            mine = [r for r in rows if (r["task"], r["variant"], r["policy"], r["budget"]) == (task, v, pol, b)]
            summary.append({"task": task, "variant": v, "policy": pol, "budget": b, "cases": len(mine),
                            **{k: sum(r[k] for r in mine) for k in ("answer", "distractor", "question", "kept")}})
    toks = [r["prompt_tokens"] for r in rows]
    meta = {"title": a.title, "machine": machine(),
            "command": "python benchmarks/kept_tokens.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "cases": len(cases), "cases_per_task": {t: sum(c.task == t for c in cases) for t in a.tasks},
            "heads_per_case": shape.num_layers * shape.num_kv_heads, "prompt_tokens": [min(toks), max(toks)],
            "wall_s": round(time.time() - t0)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    md = markdown(summary, meta)
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
