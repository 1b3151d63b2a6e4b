"""Head-importance profiler: ``headkv-sglang profile --model DIR --method M --out FILE``
(or ``python -m headkv_sglang.profile ...``).

Runs any HF causal LM in transformers with ``attn_implementation="eager"`` (so
attention weights can be read), with fixed seeds, on a CUDA device when there is one
(``--device``, ``--dtype``), and writes a :class:`~headkv_sglang.profiles.HeadProfile`
(JSON + heatmap PNG) and prints the flag to serve with. Partial results are saved to
``<out>.partial`` after every trial (:class:`Checkpoint`); the same command resumes from
them and ends bit-identical to an uninterrupted run. Methods:

``retrieval`` — retrieval heads (Wu et al. 2024, https://arxiv.org/abs/2404.15574).
    A needle sentence holding random words is planted at depth ``d`` of a
    haystack of ``L`` tokens (prose from ``pydoc_data.topics``); the model is
    asked to repeat it and decodes greedily. At every generated step, a
    (layer, query head) scores ``1 / len(needle)`` when its top-1 attended
    position lies in the needle's token span and holds the token being generated
    (copy-paste). A trial counts when the answer reproduces at least half of the
    needle's random words (the reference's ROUGE-1 recall > 50); the score is
    the mean over counted trials (``parameters["correct_trials"]``).

``r2`` — HeadKV's retrieval-reasoning heads (Fu et al. 2024,
    https://arxiv.org/abs/2410.19258, Eq. 2). Two same-shaped facts, one the
    answer and one a distractor ("Alice is 34 years old." / "Bob is 29 years
    old.", "Who is older?"), are planted in the haystack. For each answer step a
    head takes its top-``N`` attended positions, ``N`` the token length of the
    correct fact, and adds the attention weights of those inside that fact's
    span; the sum is divided by ``N * len(answer)`` (the reference code's
    normalisation, without its constant factor 10). Scores average over the
    trials the model answers correctly under greedy decoding. The answer steps
    are *teacher-forced* with the gold answer tokens: when the model's greedy
    reply starts with them (the usual case) this is exactly its own decode;
    when it is correct but worded differently ("The older one is Alice") the
    forced steps measure the same retrieval on the answer tokens themselves
    (``parameters["teacher_forced_trials"]`` counts those).

``razor`` — RazorAttention's echo and induction heads (Tang et al. 2024,
    https://arxiv.org/abs/2407.15891). A sequence of ``period`` distinct random
    vocabulary tokens (special tokens excluded) is repeated ``repeats`` times,
    after BOS when the tokenizer has one. For every query in copy ``c >= 1``:
    echo = attention mass on the earlier copies of the *same* token; induction
    = mass on the tokens that *followed* those copies. Scores are means over
    those queries and over trials. Positions are taken relative to the first
    repeated token, so BOS shifts every index by one (mindspore golden-stick's
    masks skip that shift and score BOS as an "echo" of the last first-copy
    token). ``scores = max(echo / max(echo), induction / max(induction))``.

``d2o`` — D2O's attention density (Wan et al. 2024, https://arxiv.org/abs/2406.13035).
    One forward over a haystack prompt (no needle; the question asks for a
    summary) per (length, trial); for every (layer, query head), the attention
    each key accumulates over all the prompt's queries, and its variance over
    the keys (the reference's ``attn_weights.sum(-2).var(-1)``), averaged over
    the prompts. Low variance = dense attention: the D2O policy gives such
    layers more of the budget.

``pod`` — PoD's inter-layer attention similarity (Ma et al. 2024, https://arxiv.org/abs/2412.02252).
    One forward per (length, trial) over a haystack prompt with a planted fact and a
    question about it. For the last ``queries`` prompt positions (the question and the
    template's tail: the queries that decode after it resemble), each query head's
    attention over the *distant* keys (after the first ``sink`` and before the last
    ``window`` positions), renormalised over them; a head's score at layer ``l`` is the
    overlap ``sum_j min(p_l(j), p_{l-1}(j))`` (1 - total variation, in [0, 1]) with the
    same head at layer ``l - 1``, averaged over those queries and the prompts (layer 0:
    0). The PoD policy lets the most similar (layer, KV head) rows reuse the layer below's
    distant attention.

Decode-step attention is read over the whole context (prompt + generated
tokens, as the reference code does); the prompt itself is prefilled once
without returning weights, so memory stays ``O(layers x heads x context)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from headkv_sglang.dev.haystack import haystack
from headkv_sglang.profiles import METHODS, HeadProfile, top_heads

# Defaults sized for a 2-core CPU and a 135M model (see each method's parameters in the
# shipped files); pass --lengths / --depths / --trials for a fuller sweep on bigger iron.
DEFAULTS: dict[str, dict[str, Any]] = {
    "retrieval": dict(lengths=[500, 1000, 2000, 4000], depths=4, trials=1),
    "r2": dict(lengths=[500, 1000, 2000, 4000], depths=4, trials=1),
    "razor": dict(period=500, repeats=4, trials=4),
    "d2o": dict(lengths=[1000, 2000, 4000], trials=2),
    "pod": dict(lengths=[1000, 2000], trials=3),
}
#: PoD's proximal tokens for the profile: the first POD_SINK and the last POD_WINDOW
#: (the policy's defaults: 4 sinks, the automatic window at most 32); the statistic is
#: taken over the last POD_QUERIES prompt queries.
POD_SINK, POD_WINDOW, POD_QUERIES = 4, 32, 32
D2O_QUESTION = "Summarize the text above in one sentence."

NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Laura", "Mark", "Nina", "Oscar", "Paula", "Peter", "Rachel", "Simon", "Tom", "Victor")
WORDS = ("apples", "basil", "butter", "carrots", "cheese", "chocolate", "cinnamon", "coconut",
         "garlic", "ginger", "honey", "lemons", "mint", "mushrooms", "olives", "onions", "pepper",
         "plums", "raisins", "rice", "saffron", "spinach", "tomatoes", "vanilla", "walnuts", "yogurt")
CITIES = (("Paris", "France"), ("Tokyo", "Japan"), ("Cairo", "Egypt"), ("Rome", "Italy"),
          ("Madrid", "Spain"), ("Berlin", "Germany"), ("Moscow", "Russia"), ("Beijing", "China"),
          ("Toronto", "Canada"), ("Sydney", "Australia"), ("Mumbai", "India"), ("Lima", "Peru"))


# ----------------------------------------------------------------------------- model + prompts
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    return dev


def load_model(model_dir: str, device: str | torch.device = "cpu", dtype: str = "float32"):
    """(tokenizer, model): eager attention (attention weights readable), eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation="eager")
    return tok, model.to(device).eval()


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) token span of each inserted sentence, in argument order
    chat: bool  # rendered with the tokenizer's chat template


def build_prompt(tok, n_tokens: int, inserts: list[tuple[float, str]], question: str, seed: int) -> Prompt:
    """A haystack prompt of about ``n_tokens`` tokens with ``inserts`` = [(depth, sentence)].

    Depth is the fraction of haystack sentences before the inserted one. The
    question follows the haystack; a chat template is used when the tokenizer has
    one. Token spans come from the tokenizer's character offsets, so they are
    exact whatever the BPE merges at the sentence boundaries.
    """
    chat = bool(getattr(tok, "chat_template", None))

    def render(context: str) -> tuple[str, int]:
        user = f"{context}\n\n{question}"
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                           tokenize=False)
        else:
            text = f"{user}\nAnswer:"
        return text, text.index(user)

    def encode(text: str):
        return tok(text, add_special_tokens=not chat, return_offsets_mapping=True)

    overhead = len(encode(render(" ".join(s for _, s in inserts))[0])["input_ids"])
    budget = max(0, n_tokens - overhead)
    sents = haystack(int(budget * 0.9) + 20, seed)  # ~0.75 words per token: enough sentences
    lens = [len(x) for x in tok([" " + s for s in sents], add_special_tokens=False)["input_ids"]]
    keep, total = [], 0
    for s, n in zip(sents, lens):
        if total + n > budget:
            break
        keep.append(s)
        total += n
    body = list(keep)
    for depth, sentence in sorted(inserts, key=lambda x: x[0], reverse=True):
        body.insert(round(depth * len(keep)), sentence)
    context = " ".join(body)
    text, start = render(context)
    enc = encode(text)
    spans = []
    for _, sentence in inserts:
        c0 = start + context.index(sentence)
        c1 = c0 + len(sentence)
        toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
        assert toks and toks == list(range(toks[0], toks[-1] + 1)), f"no contiguous span for {sentence!r}"
        spans.append((toks[0], toks[-1] + 1))
    return Prompt(ids=list(enc["input_ids"]), spans=spans, chat=chat)


def _stop_ids(tok, model) -> set[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


# ----------------------------------------------------------------------------- decoding with attention
@torch.inference_mode()
def _prefill(model, ids: list[int]):
    return model(input_ids=torch.tensor([ids], device=model.device), use_cache=True).past_key_values


@torch.inference_mode()
def _step(model, cache, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: (logits [V], attention float32 [L, H_q, context]) of the new query."""
    out = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True,
                output_attentions=True)
    att = torch.stack([a[0, :, -1, :] for a in out.attentions]).float().cpu()
    return out.logits[0, -1], att


def decode(model, cache, first: int, max_new: int, stop: Callable[[int], bool],
           forced: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy (or ``forced``) decode from a cache holding the prompt minus its last token ``first``.

    Returns the generated tokens and, per generated token, the attention of the
    query that produced it (``[L, H_q, context]``): step ``k``'s query is the
    token before generated token ``k``, as in the retrieval-head reference code.
    """
    tokens, atts, cur = [], [], first
    for k in range(len(forced) if forced is not None else max_new):
        logits, att = _step(model, cache, cur)
        cur = forced[k] if forced is not None else int(logits.argmax())
        tokens.append(cur)
        atts.append(att)
        if forced is None and stop(cur):
            break
    return tokens, atts


# ----------------------------------------------------------------------------- per-step scores
def retrieval_step_hits(att: torch.Tensor, span: tuple[int, int], prompt_ids: torch.Tensor, token: int) -> torch.Tensor:
    """float ``[L, H]``: 1 where the head's top-1 position is in ``span`` and holds ``token``.

    ``att`` is ``[L, H, context]`` (one query), ``prompt_ids`` int64 ``[T]``.
    """
    top = att.argmax(-1)
    inside = (top >= span[0]) & (top < span[1])
    same = prompt_ids[top.clamp(max=prompt_ids.numel() - 1)] == token
    return (inside & same).float()


def r2_step_score(att: torch.Tensor, span: tuple[int, int], n_top: int) -> torch.Tensor:
    """float ``[L, H]``: sum of the head's top-``n_top`` attention weights that fall in ``span``."""
    vals, pos = att.topk(min(n_top, att.shape[-1]), dim=-1)
    inside = (pos >= span[0]) & (pos < span[1])
    return (vals * inside).sum(-1)


def razor_masks(offset: int, period: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(echo ``[S, S]`` bool, induction ``[S, S]`` bool, query rows int64) for ``[BOS]*offset + x*repeats``.

    With ``i`` a token's index in the repeated part (sequence position
    ``offset + i``), the earlier copies of the same token sit at ``offset + i -
    k*period`` and the tokens that followed them at ``offset + i - k*period + 1``
    (``k >= 1``). Rows are the queries with at least one earlier copy (``i >= period``).
    """
    n = period * repeats
    i = torch.arange(n)[:, None]  # query index
    j = torch.arange(n)[None, :]  # key index
    echo = torch.zeros(offset + n, offset + n, dtype=torch.bool)
    ind = torch.zeros_like(echo)
    echo[offset:, offset:] = (j < i) & ((i - j) % period == 0)
    ind[offset:, offset:] = (j >= 1) & (j - 1 < i) & ((i - j + 1) % period == 0)
    rows = torch.arange(offset + period, offset + n)
    return echo, ind, rows


def razor_scores(att: torch.Tensor, offset: int, period: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores ``[...]`` from attention ``[..., S, S]`` of one repeated sequence.

    Each is the attention mass a query puts on the mask's positions, averaged
    over the queries of copies ``1 .. repeats-1``. ``offset`` is 1 when BOS was
    prepended, else 0.
    """
    echo_m, ind_m, rows = razor_masks(offset, period, repeats)
    S = echo_m.shape[0]
    if att.shape[-2:] != (S, S):
        raise ValueError(f"attention is {list(att.shape)}, expected [..., {S}, {S}] for offset={offset}, "
                         f"period={period}, repeats={repeats}")
    rows = rows.to(att.device)
    a = att[..., rows, :].float()
    echo = (a * echo_m.to(att.device)[rows]).sum(-1).mean(-1)
    ind = (a * ind_m.to(att.device)[rows]).sum(-1).mean(-1)
    return echo.cpu(), ind.cpu()


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """Partial results of one profiling run, saved after every trial so a stopped run resumes.

    ``key`` names the run (model, method, every parameter); a file written for another key is
    refused rather than mixed in. ``done`` counts finished units (trials or prompts) in the
    method's fixed order and ``state`` holds the method's running sums and RNG states as
    JSON (float64 values round-trip exactly), so a resumed run ends bit-identical to an
    uninterrupted one. ``path=None`` keeps nothing (the library default).
    """

    path: Path | None
    key: dict[str, Any]
    done: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @classmethod
    def open(cls, path: str | os.PathLike | None, key: dict[str, Any], restart: bool = False) -> "Checkpoint":
        """Resume from ``path`` if it holds this run's partial results (``restart``: discard them)."""
        key = json.loads(json.dumps(key))  # the form it has after a round trip (tuples -> lists)
        if path is None:
            return cls(None, key)
        path = Path(path)
        if restart or not path.is_file():
            return cls(path, key)
        try:
            data = json.loads(path.read_text())
            old_key, done, state, elapsed = data["key"], int(data["done"]), data["state"], float(data["elapsed_s"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable profiling checkpoint ({e}); delete it or pass --restart") from e
        if old_key != key:
            diff = sorted(k for k in set(key) | set(old_key) if key.get(k) != old_key.get(k))
            raise ValueError(f"{path} holds partial results of another run (differs in {diff}); "
                             f"pass --restart to discard them, or choose another --out")
        return cls(path, key, done, state, elapsed)

    def save(self, done: int, state: dict[str, Any], elapsed_s: float) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(dict(key=self.key, done=done, state=state, elapsed_s=elapsed_s)))
        tmp.replace(self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _units(ck: Checkpoint, cases: list, desc: str, unit: str, progress: bool):
    """A tqdm bar (rate + ETA) over the cases not yet done, counting the resumed ones."""
    from tqdm import tqdm

    return tqdm(cases[ck.done:], desc=desc, unit=unit, total=len(cases), initial=ck.done, disable=not progress,
                dynamic_ncols=True)


def _saver(ck: Checkpoint):
    t0 = time.time()
    return lambda done, state: ck.save(done, state, ck.elapsed_s + time.time() - t0)


def _table(state: dict[str, Any], name: str, shape: tuple[int, int]) -> torch.Tensor:
    if name in state:
        return torch.tensor(state[name], dtype=torch.float64)
    return torch.zeros(*shape, dtype=torch.float64)


# ----------------------------------------------------------------------------- methods
def _trial_grid(lengths: list[int], depths: int, trials: int) -> list[tuple[int, float, int]]:
    ds = [0.5] if depths == 1 else [k / (depths - 1) for k in range(depths)]
    return [(n, d, t) for n in lengths for d in ds for t in range(trials)]


def _words_in(words: list[str], text: str) -> float:
    """Fraction of ``words`` that occur as whole words in ``text`` (ROUGE-1 recall, roughly)."""
    found = set(re.findall(r"[a-z]+", text.lower()))
    return sum(w.lower() in found for w in words) / len(words)


def _first_named(text: str, names: tuple[str, ...]) -> str | None:
    """The name among ``names`` that ``text`` mentions first (whole words), or None."""
    hits = [(m.start(), n) for n in names for m in [re.search(rf"\b{re.escape(n)}\b", text)] if m]
    return min(hits)[1] if hits else None


def profile_retrieval(tok, model, lengths: list[int], depths: int, trials: int, seed: int,
                      progress: bool = True, ckpt: Checkpoint | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    cfg = model.config
    ck = ckpt or Checkpoint(None, {})
    scores = _table(ck.state, "scores", (cfg.num_hidden_layers, cfg.num_attention_heads))
    stop_ids = _stop_ids(tok, model)
    stop = lambda t: t in stop_ids or "\n" in tok.decode([t])  # noqa: E731
    grid = _trial_grid(lengths, depths, trials)
    ok, prompt_lens = ck.state.get("ok", 0), ck.state.get("prompt_lens", [])
    bar = _units(ck, grid, "retrieval", "trial", progress)
    save = _saver(ck)
    for i, (n, depth, t) in enumerate(bar, ck.done):
        if i > ck.done:
            save(i, dict(scores=scores.tolist(), ok=ok, prompt_lens=prompt_lens))
        rng = random.Random(f"retrieval-{seed}-{n}-{depth}-{t}")
        name, words = rng.choice(NAMES), rng.sample(WORDS, 4)
        needle = f"The secret recipe of {name}'s grandmother uses {', '.join(words[:3])} and {words[3]}."
        question = (f"What does the secret recipe of {name}'s grandmother use? "
                    "Repeat the sentence from the text that says it.")
        p = build_prompt(tok, n, [(depth, needle)], question, seed=rng.randrange(10**6))
        span = p.spans[0]
        prompt_lens.append(len(p.ids))
        cache = _prefill(model, p.ids[:-1])
        out, atts = decode(model, cache, p.ids[-1], max_new=span[1] - span[0] + 12, stop=stop)
        if _words_in(words, tok.decode(out, skip_special_tokens=True)) < 0.5:
            continue
        ids_t = torch.tensor(p.ids)
        hits = sum(retrieval_step_hits(a, span, ids_t, tk) for a, tk in zip(atts, out))
        scores += hits.double() / (span[1] - span[0])
        ok += 1
        bar.set_postfix(correct=f"{ok}/{bar.n + 1}")
    save(len(grid), dict(scores=scores.tolist(), ok=ok, prompt_lens=prompt_lens))
    params = dict(correct_trials=ok, prompt_tokens=[min(prompt_lens), max(prompt_lens)],
                  needle="The secret recipe of <name>'s grandmother uses <4 random words>.")
    return scores / max(ok, 1), params


def _r2_case(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(correct fact, distractor fact, question, correct name, other name)."""
    a, b = rng.sample(NAMES, 2)
    if rng.random() < 0.5:
        x, y = rng.sample(range(21, 80), 2)
        older = x > y
        fa, fb = f"{a} is {x} years old.", f"{b} is {y} years old."
        q = f"Who is older, {a} or {b}? Answer with the name only."
        return (fa, fb, q, a, b) if older else (fb, fa, q, b, a)
    (ca, na), (cb, _) = rng.sample(CITIES, 2)
    fa, fb = f"{a} lives in {ca}.", f"{b} lives in {cb}."
    q = f"Who lives in {na}, {a} or {b}? Answer with the name only."
    return fa, fb, q, a, b


def profile_r2(tok, model, lengths: list[int], depths: int, trials: int, seed: int,
               progress: bool = True, ckpt: Checkpoint | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    cfg = model.config
    ck = ckpt or Checkpoint(None, {})
    scores = _table(ck.state, "scores", (cfg.num_hidden_layers, cfg.num_attention_heads))
    stop_ids = _stop_ids(tok, model)
    stop = lambda t: t in stop_ids or "\n" in tok.decode([t])  # noqa: E731
    grid = _trial_grid(lengths, depths, trials)
    ok, forced_n, prompt_lens = ck.state.get("ok", 0), ck.state.get("forced", 0), ck.state.get("prompt_lens", [])
    bar = _units(ck, grid, "r2", "trial", progress)
    save = _saver(ck)
    for i, (n, depth, t) in enumerate(bar, ck.done):
        if i > ck.done:
            save(i, dict(scores=scores.tolist(), ok=ok, forced=forced_n, prompt_lens=prompt_lens))
        rng = random.Random(f"r2-{seed}-{n}-{depth}-{t}")
        right, wrong, question, name, other = _r2_case(rng)
        other_depth = (depth + 0.35) % 1.0  # the distractor sits elsewhere, sometimes before
        inserts = [(depth, right), (other_depth, wrong)]
        p = build_prompt(tok, n, inserts, question, seed=rng.randrange(10**6))
        span = p.spans[0]
        prompt_lens.append(len(p.ids))
        answer = tok(name if p.chat else " " + name, add_special_tokens=False)["input_ids"]
        cache = _prefill(model, p.ids[:-1])
        out, atts = decode(model, cache, p.ids[-1], max_new=8, stop=stop)
        reply = tok.decode(out, skip_special_tokens=True)
        if _first_named(reply, (name, other)) != name:
            continue
        if out[: len(answer)] != answer:
            cache.crop(len(p.ids) - 1)
            _, atts = decode(model, cache, p.ids[-1], max_new=0, stop=stop, forced=answer)
            forced_n += 1
        n_top = span[1] - span[0]
        trial = sum(r2_step_score(a, span, n_top) for a in atts[: len(answer)])
        scores += trial.double() / (n_top * len(answer))
        ok += 1
        bar.set_postfix(correct=f"{ok}/{bar.n + 1}")
    save(len(grid), dict(scores=scores.tolist(), ok=ok, forced=forced_n, prompt_lens=prompt_lens))
    params = dict(correct_trials=ok, teacher_forced_trials=forced_n,
                  prompt_tokens=[min(prompt_lens), max(prompt_lens)],
                  cases=["<A> is <x> years old. / <B> is <y> years old. -> who is older",
                         "<A> lives in <city>. / <B> lives in <city'>. -> who lives in <country>"],
                  distractor_depth="(depth + 0.35) mod 1")
    return scores / max(ok, 1), params


def _attention_modules(model) -> list[torch.nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    return mods if len(mods) == model.config.num_hidden_layers else []


@torch.inference_mode()
def profile_razor(tok, model, period: int, repeats: int, trials: int, seed: int,
                  progress: bool = True, ckpt: Checkpoint | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    cfg = model.config
    ck = ckpt or Checkpoint(None, {})
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    pool = torch.tensor([i for i in range(min(len(tok), cfg.vocab_size)) if i not in special])
    if period > pool.numel():
        raise ValueError(f"--period {period} exceeds the {pool.numel()} usable vocabulary tokens")
    bos = tok.bos_token_id
    offset = 1 if bos is not None else 0
    echo, ind = _table(ck.state, "echo", (L, H)), _table(ck.state, "induction", (L, H))
    mods = _attention_modules(model)
    layer_scores: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, output):
        # Reduce each layer's [1, H, S, S] weights at once and drop them, so memory holds one layer.
        layer_scores.append(razor_scores(output[1][0], offset, period, repeats))
        return (output[0], None, *output[2:])

    handles = [m.register_forward_hook(hook) for m in mods]
    gen = torch.Generator().manual_seed(seed)
    if "generator" in ck.state:
        gen.set_state(torch.tensor(ck.state["generator"], dtype=torch.uint8))
    save = _saver(ck)
    try:
        for i in _units(ck, list(range(trials)), "razor", "trial", progress):
            seq = pool[torch.randperm(pool.numel(), generator=gen)[:period]].tolist()
            ids = [bos] * offset + seq * repeats
            layer_scores.clear()
            out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, output_attentions=not mods)
            if not mods:  # no hookable attention modules: fall back to the returned weights
                layer_scores.extend(razor_scores(a[0], offset, period, repeats) for a in out.attentions)
            assert len(layer_scores) == L, f"got attention of {len(layer_scores)} layers, model has {L}"
            echo += torch.stack([e for e, _ in layer_scores]).double()
            ind += torch.stack([i for _, i in layer_scores]).double()
            save(i + 1, dict(echo=echo.tolist(), induction=ind.tolist(), generator=gen.get_state().tolist()))
    finally:
        for h in handles:
            h.remove()
    params = dict(sequence_tokens=offset + period * repeats, bos=bos is not None,
                  token_pool=int(pool.numel()),
                  combined="scores = max(echo / max(echo), induction / max(induction))")
    return echo / trials, ind / trials, params


@torch.inference_mode()
def profile_d2o(tok, model, lengths: list[int], trials: int, seed: int,
                progress: bool = True, ckpt: Checkpoint | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """float64 ``[L, H_q]``: the mean over prompts of each head's accumulated-attention variance."""
    cfg = model.config
    ck = ckpt or Checkpoint(None, {})
    L = cfg.num_hidden_layers
    mods = _attention_modules(model)
    per_layer: list[torch.Tensor] = []

    def variance(att: torch.Tensor) -> torch.Tensor:  # [H, S, S] -> [H]
        return att.to(torch.float64).sum(dim=1).var(dim=-1).cpu()

    def hook(module, args, output):
        per_layer.append(variance(output[1][0]))
        return (output[0], None, *output[2:])

    handles = [m.register_forward_hook(hook) for m in mods]
    total = _table(ck.state, "total", (L, cfg.num_attention_heads))
    n_tokens = ck.state.get("n_tokens", [])
    cases = [(n, t) for n in lengths for t in range(trials)]
    save = _saver(ck)
    try:
        for n, t in _units(ck, cases, "d2o", "prompt", progress):
            prompt = build_prompt(tok, n, [], D2O_QUESTION, seed + 1000 * t + n)
            per_layer.clear()
            out = model(input_ids=torch.tensor([prompt.ids], device=model.device), use_cache=False,
                        output_attentions=not mods)
            if not mods:
                per_layer.extend(variance(a[0]) for a in out.attentions)
            assert len(per_layer) == L, f"got attention of {len(per_layer)} layers, model has {L}"
            total += torch.stack(per_layer)
            n_tokens.append(len(prompt.ids))
            save(len(n_tokens), dict(total=total.tolist(), n_tokens=n_tokens))
    finally:
        for h in handles:
            h.remove()
    params = dict(question=D2O_QUESTION, prompts=len(cases), prompt_tokens=[min(n_tokens), max(n_tokens)],
                  statistic="variance over keys of the attention each key accumulates over all queries")
    return total / len(cases), params


def distant_overlap(att_lo: torch.Tensor, att_hi: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """float64 ``[H]``: mean over queries of ``sum_j min(p_lo(j), p_hi(j))``, ``p`` each
    query's attention ``[H, Q, S]`` over keys ``[sink, S - window)`` renormalised (a query
    with no weight there: overlap 0)."""
    S = att_lo.shape[-1]
    if S - window <= sink:
        raise ValueError(f"{S} keys leave no distant ones after {sink} sinks and a {window}-token window")
    ps = []
    for att in (att_lo, att_hi):
        d = att[..., sink:S - window].to(torch.float64)
        ps.append(d / d.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    return torch.minimum(ps[0], ps[1]).sum(dim=-1).mean(dim=-1)


def profile_pod(tok, model, lengths: list[int], trials: int, seed: int,
                progress: bool = True, ckpt: Checkpoint | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """float64 ``[L, H_q]``: each head's distant-attention overlap with the layer below."""
    cfg = model.config
    ck = ckpt or Checkpoint(None, {})
    L = cfg.num_hidden_layers
    mods = _attention_modules(model)
    rows: list[torch.Tensor] = []  # per layer: its last queries' attention [H, Q, S]

    def hook(module, args, output):
        rows.append(output[1][0, :, -POD_QUERIES:].detach().cpu().clone())
        return (output[0], None, *output[2:])

    handles = [m.register_forward_hook(hook) for m in mods]
    total = _table(ck.state, "total", (L, cfg.num_attention_heads))
    n_tokens = ck.state.get("n_tokens", [])
    rng = random.Random(seed)
    if "rng" in ck.state:
        version, internal, gauss = ck.state["rng"]
        rng.setstate((version, tuple(internal), gauss))
    cases = [(n, t) for n in lengths for t in range(trials)]
    save = _saver(ck)
    try:
        for n, t in _units(ck, cases, "pod", "prompt", progress):
            fact, _, question, _, _ = _r2_case(rng)
            prompt = build_prompt(tok, n, [(rng.random(), fact)], question, seed + 1000 * t + n)
            rows.clear()
            out = model(input_ids=torch.tensor([prompt.ids], device=model.device), use_cache=False,
                        output_attentions=not mods)
            if not mods:
                rows.extend(a[0, :, -POD_QUERIES:].cpu() for a in out.attentions)
            assert len(rows) == L, f"got attention of {len(rows)} layers, model has {L}"
            for layer in range(1, L):
                total[layer] += distant_overlap(rows[layer - 1], rows[layer], POD_SINK, POD_WINDOW)
            n_tokens.append(len(prompt.ids))
            save(len(n_tokens), dict(total=total.tolist(), n_tokens=n_tokens, rng=rng.getstate()))
    finally:
        for h in handles:
            h.remove()
    params = dict(prompts=len(cases), prompt_tokens=[min(n_tokens), max(n_tokens)], sink=POD_SINK,
                  window=POD_WINDOW, queries=POD_QUERIES,
                  statistic="overlap sum_j min(p_l, p_l-1) of the last queries' attention over distant keys "
                            "(renormalised), with the same head one layer below")
    return total / len(cases), params


# ----------------------------------------------------------------------------- driver
def run(model_dir: str, method: str, *, lengths: list[int] | None = None, depths: int | None = None,
        trials: int | None = None, seed: int = 0, max_length: int | None = None, period: int | None = None,
        repeats: int | None = None, progress: bool = True, checkpoint: str | os.PathLike | None = None,
        restart: bool = False, device: str = "cpu", dtype: str = "float32") -> HeadProfile:
    """Profile the model in ``model_dir`` with ``method``; unset arguments take :data:`DEFAULTS`.

    ``checkpoint``: a file the partial results are saved to after every trial; a run with the
    same model and parameters resumes from it (``restart=True`` discards it). The caller
    deletes it once the profile is written (:func:`main` does).
    """
    if method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; choose one of {list(METHODS)}")
    import transformers

    d = DEFAULTS[method]
    torch.manual_seed(seed)
    random.seed(seed)
    t0 = time.time()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    dev = resolve_device(device)
    tok, model = load_model(model_dir, dev, dtype)
    cfg = model.config
    ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
    max_length = min(x for x in (max_length, ctx) if x) if (max_length or ctx) else None
    params: dict[str, Any] = dict(seed=seed, max_length=max_length)
    echo = induction = None

    def open_checkpoint(**run_params: Any) -> Checkpoint:
        key = dict(model=str(Path(model_dir).resolve()), method=method, seed=seed, max_length=max_length,
                   dtype=dtype, **run_params)
        return Checkpoint.open(checkpoint, key, restart)

    if method == "razor":
        period = period or d["period"]
        repeats = repeats or d["repeats"]
        trials = trials or d["trials"]
        if max_length and 1 + period * repeats > max_length:
            raise ValueError(f"--period {period} x --repeats {repeats} (+ BOS) exceeds --max-length {max_length}")
        ck = open_checkpoint(period=period, repeats=repeats, trials=trials)
        e, i, extra = profile_razor(tok, model, period, repeats, trials, seed, progress, ck)
        echo, induction = e.tolist(), i.tolist()
        scores = torch.maximum(e / e.max().clamp_min(1e-12), i / i.max().clamp_min(1e-12))
        params.update(period=period, repeats=repeats, trials=trials, **extra)
    elif method in ("d2o", "pod"):
        lengths = _clip_lengths(list(lengths or d["lengths"]), max_length, room_for_decode=0)
        trials = trials or d["trials"]
        fn = profile_d2o if method == "d2o" else profile_pod
        ck = open_checkpoint(lengths=lengths, trials=trials)
        scores, extra = fn(tok, model, lengths, trials, seed, progress, ck)
        params.update(lengths=lengths, trials_per_length=trials, **extra)
    else:
        lengths = _clip_lengths(list(lengths or d["lengths"]), max_length, room_for_decode=64)
        depths = depths or d["depths"]
        trials = trials or d["trials"]
        fn = profile_retrieval if method == "retrieval" else profile_r2
        ck = open_checkpoint(lengths=lengths, depths=depths, trials=trials)
        scores, extra = fn(tok, model, lengths, depths, trials, seed, progress, ck)
        params.update(lengths=lengths, depths=depths, trials_per_cell=trials,
                      trials=len(lengths) * depths * trials, **extra)
    if ck.done:
        params.update(resumed_after=ck.done)
    params.update(elapsed_s=round(time.time() - t0 + ck.elapsed_s, 1), torch=torch.__version__,
                  transformers=transformers.__version__, attn_implementation="eager")
    if dtype != "float32" or dev.type != "cpu":  # the shipped test-model files: float32 on the CPU, unrecorded
        params.update(dtype=dtype, device=str(dev))
    return HeadProfile(
        architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        model_name=Path(model_dir).resolve().name,
        num_layers=cfg.num_hidden_layers,
        num_q_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        method=method, parameters=params, scores=scores.tolist(), echo=echo, induction=induction,
    )


def _clip_lengths(lengths: list[int], max_length: int | None, room_for_decode: int) -> list[int]:
    """``lengths`` capped at ``max_length`` minus the positions decoding needs (a note when it clips)."""
    if not max_length:
        return lengths
    room = max_length - room_for_decode
    if any(n > room for n in lengths):
        print(f"note: lengths above {room} tokens clipped to it (--max-length {max_length})", file=sys.stderr)
    return sorted({min(n, room) for n in lengths})


def mass_fraction(table: list[list[float]], mass: float = 0.5) -> float:
    """Fraction of heads that together hold ``mass`` of the table's total score."""
    vals = sorted((v for row in table for v in row), reverse=True)
    total = sum(vals)
    if total <= 0:
        return 0.0
    acc = 0.0
    for k, v in enumerate(vals, 1):
        acc += v
        if acc >= mass * total:
            return k / len(vals)
    return 1.0


def razor_protected(prof: HeadProfile, echo_fraction: float = 0.01, induction_fraction: float = 0.14) -> set:
    """Query heads RazorAttention protects: top 1% by echo plus top 14% by induction (the paper's split)."""
    n = prof.num_layers * prof.num_q_heads
    return (set(top_heads(prof.echo, math.ceil(echo_fraction * n - 1e-9)))
            | set(top_heads(prof.induction, math.ceil(induction_fraction * n - 1e-9))))


def summary(prof: HeadProfile) -> str:
    n = prof.num_layers * prof.num_q_heads
    lines = [f"top-5 (layer, query head): {prof.top_heads(5)}",
             f"top-5 (layer, KV head):    {prof.top_heads(5, 'kv_scores')}"]
    if prof.method == "razor":
        prot = razor_protected(prof)
        lines.insert(0, f"top-5 echo: {prof.top_heads(5, 'echo')}   top-5 induction: {prof.top_heads(5, 'induction')}")
        lines.append(f"important (top 1% echo + top 14% induction): {len(prot)}/{n} query heads = {len(prot) / n:.1%}")
    elif prof.method == "d2o":
        from headkv_sglang.policies.d2o import D2O

        shares = D2O(density=torch.as_tensor(prof.kv_scores, dtype=torch.float64)).layer_shares()
        lines.append("D2O layer shares of the budget (x the uniform share): "
                     + " ".join(f"{x:.2f}" for x in (shares * prof.num_layers).tolist()))
    elif prof.method == "pod":
        from headkv_sglang.policies.pod import sharing_map

        kv = torch.as_tensor(prof.kv_scores, dtype=torch.float64)
        mine = kv[1:]
        lines.append(f"overlap with the layer below (layers >= 1, KV heads): mean {float(mine.mean()):.3f}, "
                     f"min {float(mine.min()):.3f}, max {float(mine.max()):.3f}")
        for share in (0.1, 0.3, 0.5):
            m = sharing_map(kv, share)
            lines.append(f"--kv-pod-share {share}: {int(m.sum())} sharing rows, least overlap among them "
                         f"{float(kv[m].min()) if bool(m.any()) else float('nan'):.3f}")
    else:
        frac = mass_fraction(prof.scores)
        strong = sum(v > 0.1 for row in prof.scores for v in row)
        lines.append(f"important: heads holding 50% of the score mass = {frac:.1%} of {n} query heads; "
                     f"score > 0.1: {strong}")
        lines.append(f"trials counted (answered correctly): {prof.parameters['correct_trials']}/{prof.parameters['trials']}")
    return "\n".join(lines)


def policies_reading(method: str) -> list[str]:
    """The ``--kv-policy`` names whose policy reads a ``method`` profile."""
    from headkv_sglang.policies.registry import policy_class, policy_names

    return [name for name in policy_names() if policy_class(name).profile_method == method]


def main(argv: list[str] | None = None, prog: str = "python -m headkv_sglang.profile") -> int:
    p = argparse.ArgumentParser(prog=prog,
                                description="Measure per-head importance of an HF causal LM and write a head profile "
                                            "(JSON + heat-map PNG). Progress is saved after every trial to "
                                            "<out>.partial: run the same command again to resume.")
    p.add_argument("--model", required=True, help="HF model directory (config.json + weights + tokenizer)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="r2: --kv-policy headkv; razor: razor; d2o: d2o; pod: pod; retrieval: Wu et al.'s heads")
    p.add_argument("--out", required=True, help="profile JSON to write; a heatmap <stem>.png goes next to it")
    p.add_argument("--lengths", type=int, nargs="+", help=f"prompt lengths in tokens (retrieval/r2/d2o/pod; default "
                   f"{DEFAULTS['r2']['lengths']}, d2o {DEFAULTS['d2o']['lengths']}, pod {DEFAULTS['pod']['lengths']})")
    p.add_argument("--depths", type=int, help="needle depths per length, evenly from 0 to 1 (retrieval/r2; "
                   f"default {DEFAULTS['r2']['depths']})")
    p.add_argument("--trials", type=int, help="needles per (length, depth) for retrieval/r2 (default 1); random "
                   f"sequences for razor (default {DEFAULTS['razor']['trials']}); prompts per length for d2o "
                   f"(default {DEFAULTS['d2o']['trials']}) and pod (default {DEFAULTS['pod']['trials']})")
    p.add_argument("--period", type=int, help=f"razor: random tokens per copy (default {DEFAULTS['razor']['period']})")
    p.add_argument("--repeats", type=int, help=f"razor: copies (default {DEFAULTS['razor']['repeats']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, help="cap on prompt tokens (default: the model's context)")
    p.add_argument("--device", default="auto", help="auto (a CUDA device when there is one, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="model weights and attention (float32: 4 bytes a parameter; bfloat16 halves that)")
    p.add_argument("--restart", action="store_true", help="discard <out>.partial instead of resuming from it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: {args.model} has no config.json (expected a local HF model directory)")
    for name in ("depths", "trials", "period", "repeats", "max_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if args.lengths and min(args.lengths) < 64:
        p.error(f"--lengths: each must be >= 64 tokens, got {args.lengths}")
    try:  # the heat map needs matplotlib: say so before hours of profiling, not after
        import matplotlib  # noqa: F401
    except ImportError:
        p.error("the heat-map PNG needs matplotlib: pip install 'headkv-sglang[plots]'")
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    t0 = time.time()
    try:
        prof = run(args.model, args.method, lengths=args.lengths, depths=args.depths, trials=args.trials,
                   seed=args.seed, max_length=args.max_length, period=args.period, repeats=args.repeats,
                   progress=not args.no_progress, checkpoint=partial, restart=args.restart,
                   device=args.device, dtype=args.dtype)
    except ValueError as e:
        p.error(str(e))
    except KeyboardInterrupt:
        print(f"\nstopped; partial results are in {partial}: run the same command again to resume", file=sys.stderr)
        return 130
    # the exact command, so the shipped profile says how to make it again
    prof.parameters["command"] = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
    path = prof.save(out)
    partial.unlink(missing_ok=True)
    print(f"{args.method} profile of {prof.model_name}: {path} (+ {path.with_suffix('.png').name}) "
          f"in {time.time() - t0:.0f} s")
    print(summary(prof))
    users = policies_reading(args.method)
    flag = f"--kv-head-profile {shlex.quote(str(path.resolve()))}"
    if users:
        print("serve with: " + " or ".join(f"--kv-policy {u} {flag}" for u in users))
    else:
        print(f"no built-in --kv-policy reads '{args.method}' profiles; pass it to your own policy with {flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
