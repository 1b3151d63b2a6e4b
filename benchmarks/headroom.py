"""How much of a low-budget cell's loss is the scoring and how much the budget: oracle selections.

    python benchmarks/headroom.py --out benchmarks/results/headroom_cpu

In-process, no server. Per case the test model (float32, eager attention, CPU) prefills the
chat prompt once with full attention, as the server does, then decodes greedily from that one
prefill several times, each time with every KV head's decode attention limited to the prompt
tokens a selection keeps for it (the generated tokens are always seen): the server's ragged
cache, expressed as a mask. The first output token comes from the full prefill in both. Per
(variant, policy, budget) the selections are:

* ``policy``: the policy's own (``build_policy`` + ``compress_layer`` with the server's scoring
  span). Checks the simulation: on the fidelity grid's cases (``--grid``) its answers can be
  compared with the server's (``--compare FILE.json``).
* ``oracle``: the same per-head budgets, tokens ranked by the attention the full-KV answer's
  decode steps paid them (summed over the steps, averaged over the KV head's query heads): the
  model's own reading while it answers, the best any ranking by attention can do at that budget.
* ``answer``: the policy's ranking with the planted answer's tokens moved to the top of every
  head (same budgets: was the failure not keeping the number?).
* ``lookahead:N`` (``--kinds``): the oracle's rule with only the first ``N`` decode steps: tokens
  ranked by the attention the first ``N`` generated tokens of the full-KV answer paid them (the
  queries a server could get by decoding ``N`` tokens before it compresses), decoded like the
  others. ``N`` >= the answer's length is the oracle. Each full row records ``answer_step``: how
  many output tokens precede the planted answer (lookahead steps up to it have not read it yet).

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kept_tokens import add_case_args, load, render, select  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from benchmarks.scoring import calibration_cases, variant_params  # noqa: E402
from benchmarks.tasks import score  # noqa: E402
from headkv_sglang.config import KVPolicyConfig, ModelShape  # noqa: E402
from headkv_sglang.policies.registry import build_policy  # noqa: E402
from headkv_sglang.question import QuestionFinder  # noqa: E402

KINDS = ("policy", "oracle", "answer")  # the default --kinds; also lookahead:N
# The fidelity grid's needle cases (benchmarks/results/fidelity_needles30_cpu.md).
GRID = dict(tasks=["niah", "multikey"], lengths=[1000, 2000, 3000, 4000, 5500, 7000],
            niah_lengths=[1000, 2000, 4000, 7000, 3000, 5500], depths=[0.1, 0.3, 0.5, 0.7, 0.9], seeds=3)


@dataclasses.dataclass
class _State:
    """What the patched attention does: mask decode steps, record their attention."""

    prompt_len: int = 0
    keep: list | None = None  # per layer, bool [Hkv, T]: prompt tokens each KV head sees
    record: list | None = None  # per layer, float32 [Hq, T]: decode attention on the prompt, summed


class MaskedDecoder:
    """Full prefill once, then greedy decodes with per-(layer, KV head) prompt masks."""

    def __init__(self, tok, model):
        import transformers.models.llama.modeling_llama as llama

        self.tok, self.model, self.llama = tok, model, llama
        self.state = _State()
        self.eos = {model.generation_config.eos_token_id} if isinstance(
            model.generation_config.eos_token_id, int) else set(model.generation_config.eos_token_id or [])
        self.eos.add(tok.eos_token_id)
        self._original = llama.eager_attention_forward
        self.qs: list[torch.Tensor] = []
        self.ks: list[torch.Tensor] = []

    def _attend(self, module, query, key, value, attention_mask, *args, **kwargs):
        st, layer = self.state, module.layer_idx
        decode = query.shape[2] == 1 and st.prompt_len > 0
        if not decode:  # the prefill: full attention, keep the post-RoPE q / k for the policies
            self.qs.append(query[0].detach().clone())
            self.ks.append(key[0].detach().clone())
        elif st.keep is not None:
            hidden = ~st.keep[layer].repeat_interleave(module.num_key_value_groups, dim=0)  # [Hq, T]
            extra = torch.zeros(1, query.shape[1], 1, key.shape[2], dtype=query.dtype)
            extra[0, :, 0, :st.prompt_len].masked_fill_(hidden, -math.inf)
            attention_mask = extra if attention_mask is None else attention_mask + extra
        out, weights = self._original(module, query, key, value, attention_mask, *args, **kwargs)
        if decode and st.record is not None:
            st.record[layer] += weights[0, :, 0, :st.prompt_len].float()
        return out, weights

    def __enter__(self):
        self.llama.eager_attention_forward = self._attend
        return self

    def __exit__(self, *exc):
        self.llama.eager_attention_forward = self._original

    def prefill(self, ids: list[int]):
        self.state = _State()
        self.qs, self.ks = [], []
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
        if len(self.qs) != self.model.config.num_hidden_layers:
            raise RuntimeError(f"captured {len(self.qs)} layers of {self.model.config.num_hidden_layers}: "
                               "the model does not use Llama's eager attention")
        self.cache, self.first = out.past_key_values, int(out.logits[0, -1].argmax())
        self.state.prompt_len = len(ids)

    def decode(self, max_tokens: int, keep: list | None = None, record: bool = False,
               snapshots: tuple[int, ...] = ()) -> tuple[str, list | None, dict]:
        """Greedy output text from the prefill; ``record``: also the summed decode attention (per
        layer ``[Hq, T]``), and in ``{n: record}`` the sum over the first ``n`` decode steps for each
        ``n`` in ``snapshots`` (the whole sum when the output ends sooner)."""
        st = self.state
        st.keep = keep
        n_q = self.model.config.num_attention_heads
        st.record = [torch.zeros(n_q, st.prompt_len) for _ in self.qs] if record else None
        taken: dict = {}
        out = [self.first]
        try:
            with torch.no_grad():
                while len(out) < max_tokens and out[-1] not in self.eos:
                    logits = self.model(torch.tensor([[out[-1]]]), past_key_values=self.cache, use_cache=True).logits
                    out.append(int(logits[0, -1].argmax()))
                    if record and len(out) - 1 in snapshots:
                        taken[len(out) - 1] = [r.clone() for r in st.record]
        finally:
            grown = self.cache.get_seq_length() - st.prompt_len
            if grown:
                self.cache.crop(-grown)
            st.keep = None
        text = self.tok.decode([t for t in out if t not in self.eos], skip_special_tokens=True)
        if record:
            taken.update({n: st.record for n in snapshots if n not in taken})
        return text, st.record, taken


def lookahead_steps(kind: str) -> int:
    """``N`` of a ``lookahead:N`` kind (0 for the others)."""
    return int(kind.partition(":")[2]) if kind.startswith("lookahead:") else 0


def check_kind(kind: str) -> str:
    """``policy`` | ``oracle`` | ``answer`` | ``lookahead:N`` (N >= 1), else ArgumentTypeError."""
    n = kind.partition(":")[2]
    if kind in KINDS or (kind.startswith("lookahead:") and n.isdigit() and int(n) >= 1):
        return kind
    raise argparse.ArgumentTypeError(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}, lookahead:N (N >= 1)")


def selections(dec: MaskedDecoder, cfg: KVPolicyConfig, shape: ModelShape, finder: QuestionFinder,
               ids: list[int], oracle: list[torch.Tensor], answer: list[tuple[int, int]],
               kinds: tuple[str, ...] = KINDS, early: dict | None = None) -> dict:
    """``{kind: per-layer keep masks}`` for one (variant, policy, budget); ``early``: ``{N: the
    decode attention of the first N steps}`` for the ``lookahead:N`` kinds."""
    group = shape.num_q_heads // shape.num_kv_heads
    out = {}
    for kind in kinds:
        policy = dataclasses.replace(build_policy(cfg, shape))  # a copy: build_policy may share instances
        own = type(policy).token_scores.__get__(policy)

        def scores(q_win, k, layer, q_end=None, kind=kind, own=own):
            s = own(q_win, k, layer, q_end=q_end)
            if kind == "oracle" or kind.startswith("lookahead:"):
                seen = oracle if kind == "oracle" else early[lookahead_steps(kind)]
                read = seen[layer].reshape(shape.num_kv_heads, group, -1).mean(dim=1)
                s = torch.where(torch.isinf(s), s, read)  # the policy's always-kept tokens stay
            elif kind == "answer":
                top = s[torch.isfinite(s)].max() + 1.0
                for a, b in answer:  # above every ranked token; the always-kept (+inf) stay
                    s = s.clone()
                    s[:, a:b] = torch.where(torch.isinf(s[:, a:b]), s[:, a:b], top)
            return s

        object.__setattr__(policy, "token_scores", scores)  # frozen dataclass: this instance only
        out[kind] = select(policy, cfg, finder, ids, dec.qs, dec.ks)
    return out


def analyse(dec: MaskedDecoder, shape: ModelShape, finder: QuestionFinder, case, cfgs: dict,
            kinds: tuple[str, ...] = KINDS) -> list[dict]:
    _, ids, answer = render(dec.tok, case)
    dec.prefill(ids)
    steps = tuple(sorted({lookahead_steps(k) for k in kinds} - {0}))
    full, oracle, early = dec.decode(case.max_tokens, record=True, snapshots=steps)
    at = min((full.find(a) for a in case.answers if a in full), default=-1)
    rows = [{"variant": "-", "policy": "full", "budget": "full", "kind": "full", "output": full,
             "score": score(case, full), "kept": 1.0,
             "answer_step": len(dec.tok.encode(full[:at], add_special_tokens=False)) if at >= 0 else None}]
    for (v, pol, b), base in cfgs.items():
        cfg = base.for_prompt(len(ids))
        for kind, keeps in selections(dec, cfg, shape, finder, ids, oracle, answer, kinds, early).items():
            output, _, _ = dec.decode(case.max_tokens, keep=keeps)
            held = sum(int(k.sum()) for k in keeps) / (len(keeps) * keeps[0].shape[0] * len(ids))
            rows.append({"variant": v, "policy": pol, "budget": b, "kind": kind, "output": output,
                         "score": score(case, output), "kept": round(held, 4),
                         "agrees_with_full": output.strip() == full.strip()})
    for r in rows:
        r.update(task=case.task, prompt_tokens=len(ids), answers=case.answers,
                 target_tokens=case.meta.get("target_tokens"), depth=case.meta.get("depth"),
                 seed=case.meta.get("seed"))
    return rows


def summarize(rows: list[dict], tasks: list[str]) -> list[dict]:
    out = []
    order = lambda k: (k[0] != "-", k[0], k[1], _budget_order(k[2]), _kind_order(k[3]))  # noqa: E731
    keys = sorted({(r["variant"], r["policy"], r["budget"], r["kind"]) for r in rows}, key=order)
    for key in keys:
        mine = [r for r in rows if (r["variant"], r["policy"], r["budget"], r["kind"]) == key]
        row = {"variant": key[0], "policy": key[1], "budget": key[2], "kind": key[3], "cases": len(mine),
               "kept": round(sum(r["kept"] for r in mine) / len(mine), 4)}
        for t in tasks:
            row[t] = sum(r["score"] for r in mine if r["task"] == t)
        row["total"] = sum(r["score"] for r in mine)
        out.append(row)
    return out


def _kind_order(kind: str) -> tuple[int, int]:
    """full, then KINDS in their order, then lookahead:N by N."""
    if kind == "full":
        return (-1, 0)
    if kind in KINDS:
        return (KINDS.index(kind), 0)
    return (len(KINDS), lookahead_steps(kind))


def _budget_order(b: str) -> float:
    return math.inf if b == "full" else float(b.rstrip("%")) if b.endswith("%") else float(b) * 1e6


def compare(rows: list[dict], server_file: str) -> list[dict]:
    """Agreement of the simulated ``policy`` rows with the server's outputs on the same cases."""
    server = json.loads(Path(server_file).read_text())
    params = server["meta"].get("kv_params") or {}
    want = {}
    for r in server["rows"]:
        want[(r["task"], r["target_tokens"], r.get("depth"), tuple(r["answers"]), r["policy"], r["budget"])] = r
    out = {}
    for r in rows:
        if r["kind"] not in ("policy", "full"):
            continue
        if r["kind"] == "policy" and variant_params(r["variant"]) != params:
            continue
        s = want.get((r["task"], r["target_tokens"], r["depth"], tuple(r["answers"]), r["policy"], r["budget"]))
        if s is None:
            continue
        c = out.setdefault((r["variant"], r["policy"], r["budget"]), {"cases": 0, "same_output": 0,
                                                                       "sim_score": 0.0, "server_score": 0.0})
        c["cases"] += 1
        c["same_output"] += r["output"].strip() == s["output"].strip()
        c["sim_score"] += r["score"]
        c["server_score"] += s["score"]
    return [{"variant": v, "policy": p, "budget": b, **c} for (v, p, b), c in out.items()]


def answer_steps(rows: list[dict], tasks: list[str]) -> dict:
    """Per task, the median number of full-KV output tokens before the planted answer (None: never found)."""
    out = {}
    for t in tasks:
        steps = sorted(r["answer_step"] for r in rows if r["kind"] == "full" and r["task"] == t
                       and r.get("answer_step") is not None)
        out[t] = steps[len(steps) // 2] if steps else None
    return out


def markdown(summary: list[dict], checks: list[dict], meta: dict) -> str:
    tasks = meta["tasks"]
    lines = [f"# {meta['title']}", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Cases: {meta['cases']} ({', '.join(f'{t}: {n}' for t, n in meta['cases_per_task'].items())}), "
             f"{meta['prompt_tokens'][0]}-{meta['prompt_tokens'][1]} prompt tokens ({meta['case_set']}); "
             f"{meta['wall_s']} s.", "",
             "Answers found (sum of scores) per task, decoding from one full-attention prefill with each KV head's "
             "attention limited to the prompt tokens a selection keeps: **policy** = the policy's own selection; "
             "**oracle** = the same per-head budgets, tokens ranked by the attention the full-KV answer paid them; "
             "**answer** = the policy's ranking with the planted answer's tokens put first in every head; "
             "**lookahead:N** = the oracle's ranking from the first N decode steps of the full-KV answer only. "
             "kept = prompt KV held, share of L x H x T.", "",
             "Output tokens before the planted answer in the full-KV answer (median): "
             + ", ".join(f"{t} {n}" for t, n in meta.get("answer_step", {}).items()) + ".", "",
             "| variant | policy | budget | selection | " + " | ".join(tasks) + " | total | kept |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    n_task = meta["cases_per_task"]
    for s in summary:
        cells = " | ".join(f"{s[t]:g} / {n_task[t]}" for t in tasks)
        lines.append(f"| {s['variant']} | {s['policy']} | {s['budget']} | {s['kind']} | {cells} | "
                     f"{s['total']:g} / {s['cases']} | {100 * s['kept']:.1f}% |")
    if checks:
        lines += ["", f"Simulation against the server ({meta['compare']}, same cases): the `policy` rows' outputs "
                  "and the server's.", "",
                  "| variant | policy | budget | cases | same output | simulated score | server score |",
                  "|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['variant']} | {c['policy']} | {c['budget']} | {c['cases']} | {c['same_output']} | "
                         f"{c['sim_score']:g} | {c['server_score']:g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_args(p, ["question:16"])
    p.add_argument("--grid", action="store_true",
                   help="the fidelity grid's 48 needle cases (niah 30, multikey 18; 1k-7k tokens) instead of "
                        "the calibration cases")
    p.add_argument("--kinds", nargs="+", type=check_kind, default=list(KINDS),
                   help="selections: policy, oracle, answer, lookahead:N (ranked by the first N decode steps)")
    p.add_argument("--limit", type=int, default=0, help="only the first N cases (0: all)")
    p.add_argument("--compare", help="a fidelity.py JSON over the same cases: check the simulated policy rows")
    p.add_argument("--title", default="Headroom: the policy's selection, an oracle's and the answer kept")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/headroom_cpu"))
    a = p.parse_args(argv)
    if a.compare and not Path(a.compare).is_file():
        p.error(f"--compare: no such file {a.compare}")
    tok, model, shape, finder, cfgs = load(p, a)
    from tqdm import tqdm

    from benchmarks.fidelity import make_cases

    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    if a.grid:
        cases = make_cases(GRID["tasks"], GRID["lengths"], GRID["niah_lengths"], GRID["depths"], GRID["seeds"], count)
        cases = [c for c in cases if c.task in a.tasks]
    else:
        cases = calibration_cases(a.tasks, a.lengths, a.depths, a.seeds, count)
    if a.limit:
        cases = cases[:a.limit]
    t0 = time.time()
    rows = []
    with MaskedDecoder(tok, model) as dec:
        for case in tqdm(cases, desc="cases", disable=None):
            rows += analyse(dec, shape, finder, case, cfgs, tuple(dict.fromkeys(a.kinds)))
    tasks = [t for t in a.tasks if any(c.task == t for c in cases)]
    summary = summarize(rows, tasks)
    checks = compare(rows, a.compare) if a.compare else []
    toks = [r["prompt_tokens"] for r in rows]
    meta = {"title": a.title, "machine": machine(),
            "command": "python benchmarks/headroom.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "case_set": "the fidelity grid's needle cases" if a.grid else "calibration seeds from 900",
            "cases": len(cases), "tasks": tasks,
            "cases_per_task": {t: sum(c.task == t for c in cases) for t in tasks},
            "prompt_tokens": [min(toks), max(toks)], "wall_s": round(time.time() - t0), "compare": a.compare,
            "answer_step": answer_steps(rows, tasks)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "summary": summary, "checks": checks,
                                                 "rows": rows}, indent=1) + "\n")
    md = markdown(summary, checks, meta)
    Path(f"{a.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
