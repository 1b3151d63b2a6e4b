"""Generated long-context tasks (RULER-style) and their scorers; no downloads.

Haystacks are prose from the Python reference manual that ships with Python
(``headkv_sglang.dev.haystack``), so every prompt is reproducible from its seed. Each task
builds a ``Case`` of about ``target_tokens`` tokens (measured with the served model's
tokenizer, which the caller passes as a ``count_tokens`` function):

- ``niah``: one planted number at a depth; the answer is the number.
- ``multikey``: four "special magic number for <key>" needles of the same shape, the
  question names one key; the other three are distractors.
- ``multivalue``: four numbers planted for the same key; score = share of them returned.
- ``vartrack``: variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... spread
  over the text, plus a distractor chain with another value; score = share of the chain's
  variables returned.
- ``cwe``: common-word extraction: a numbered word list where ten words occur many times
  and the rest rarely; score = share of the ten returned.
- ``summary``: summarize a prose document; scored by ROUGE-L F1 against the full-KV
  summary of the same document (agreement with full KV, not with a reference).

Each case's ``max_tokens`` leaves room for the whole answer in the words the test model uses at
full KV (it restates the question first: "The special magic number for misty-quarry mentioned
in the text is 79393." is 21 tokens); a cut-off answer would score the model 0 on a task it
solves (multikey did, at 16 tokens, until 2026-12-04). Scores are in [0, 1]. Nothing here
imports SGLang.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from headkv_sglang.dev.haystack import haystack

TASKS = ["niah", "multikey", "multivalue", "vartrack", "cwe", "summary"]

_WORDS_A = ["amber", "brisk", "cobalt", "dusty", "ember", "frosty", "golden", "hollow", "ivory", "jade",
            "lunar", "misty", "noble", "olive", "pale", "quiet", "rusty", "silver", "tawny", "velvet"]
_WORDS_B = ["falcon", "harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "river", "saddle",
            "thistle", "valley", "willow", "anchor", "beacon", "canyon", "dagger", "fjord", "garnet"]
_CWE_VOCAB = sorted({
    "apple", "bridge", "candle", "desert", "engine", "forest", "garden", "hammer", "island", "jacket",
    "kettle", "ladder", "mirror", "needle", "oyster", "pillow", "rabbit", "saddle", "tunnel", "violin",
    "wagon", "yogurt", "zipper", "basket", "castle", "dragon", "feather", "glacier", "helmet", "jungle",
    "kitten", "lemon", "marble", "napkin", "orange", "parrot", "quilt", "rocket", "spider", "teapot",
    "umbrella", "velvet", "walnut", "anchor", "button", "cactus", "dolphin", "eagle", "falcon", "giraffe",
    "harbor", "igloo", "jigsaw", "koala", "lantern", "magnet", "nutmeg", "otter", "pepper", "raven",
    "salmon", "tomato", "unicorn", "vulture", "window", "yacht", "acorn", "blanket", "cookie", "drum",
    "envelope", "fountain", "guitar", "hedgehog", "insect", "jelly", "kayak", "lobster", "mango", "nest",
    "olive", "pumpkin", "radish", "scarf", "tiger", "turtle", "vase", "wizard", "badger", "cherry",
    "donkey", "flute", "goose", "hazel", "iris", "juniper", "lilac", "moose", "nickel", "pebble",
})


@dataclass
class Case:
    task: str
    prompt: str
    answers: list[str]  # what a correct output contains (all of them for full credit)
    max_tokens: int
    meta: dict = field(default_factory=dict)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10_000, 99_999))


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_WORDS_A)}-{rng.choice(_WORDS_B)}"
        if k not in used:
            used.add(k)
            return k


def _plant(sents: list[str], facts: list[str], rng: random.Random, depths: list[float] | None = None) -> str:
    """Insert ``facts`` into the sentence list at ``depths`` (or spread at random), in order."""
    out = list(sents)
    if depths is None:
        depths = sorted(rng.random() for _ in facts)
    for fact, d in sorted(zip(facts, depths), key=lambda x: -x[1]):
        out.insert(round(d * len(out)), fact)
    return " ".join(out)


def _niah(words: int, seed: int, depth: float) -> Case:
    rng = random.Random(seed * 7919 + int(depth * 1000))
    number = _number(rng)
    body = _plant(haystack(words, seed), [f"The secret number is {number}."], rng, [depth])
    return Case("niah", f"{body}\n\nWhat is the secret number? Answer with the number only.", [number], 16,
                {"depth": depth})


def _multikey(words: int, seed: int, depth: float) -> Case:
    rng = random.Random(seed * 104_729 + 1)
    used: set[str] = set()
    keys = [_key(rng, used) for _ in range(4)]
    nums = [_number(rng) for _ in keys]
    target = rng.randrange(4)
    facts = [f"One of the special magic numbers for {k} is: {n}." for k, n in zip(keys, nums)]
    body = _plant(haystack(words, seed), facts, rng)
    q = f"What is the special magic number for {keys[target]} mentioned in the text? Answer with the number only."
    return Case("multikey", f"{body}\n\n{q}", [nums[target]], 32, {"key": keys[target], "distractors": nums})


def _multivalue(words: int, seed: int, depth: float) -> Case:
    rng = random.Random(seed * 15_485_863 + 2)
    key = _key(rng, set())
    nums = []
    while len(nums) < 4:
        n = _number(rng)
        if n not in nums:
            nums.append(n)
    facts = [f"One of the special magic numbers for {key} is: {n}." for n in nums]
    body = _plant(haystack(words, seed), facts, rng)
    q = f"What are all the special magic numbers for {key} mentioned in the text? List the numbers only."
    return Case("multivalue", f"{body}\n\n{q}", nums, 64, {"key": key})


def _vartrack(words: int, seed: int, depth: float) -> Case:
    rng = random.Random(seed * 32_452_843 + 3)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: set[str] = set()
    while len(names) < 8:
        names.add("".join(rng.choice(letters) for _ in range(5)))
    names_l = sorted(names)
    rng.shuffle(names_l)
    chain, decoy = names_l[:4], names_l[4:]
    value, other = _number(rng), _number(rng)
    facts = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
    dfacts = [f"VAR {decoy[0]} = {other}."] + [f"VAR {b} = VAR {a}." for a, b in zip(decoy, decoy[1:])]
    # each chain keeps its order; the two chains interleave at random depths
    depths = sorted(rng.random() for _ in range(8))
    pick = sorted(rng.sample(range(8), 4))
    cd = [depths[i] for i in pick]
    dd = [depths[i] for i in range(8) if i not in pick]
    body = _plant(haystack(words, seed), facts + dfacts, rng, cd + dd)
    q = (f"Find all variables that are assigned the value {value} in the text above, directly or through "
         f"other variables. List the variable names only.")
    return Case("vartrack", f"{body}\n\n{q}", chain, 96, {"value": value, "decoy": decoy})


def _cwe(words: int, seed: int, depth: float) -> Case:
    rng = random.Random(seed * 49_979_687 + 4)
    vocab = list(_CWE_VOCAB)
    rng.shuffle(vocab)
    common, rare = vocab[:10], vocab[10:]
    n_items = max(40, words)  # one word per numbered item (~3 tokens each with the number)
    per_common = max(4, n_items // 40)  # the ten common words fill ~25% of the list
    items = [w for w in common for _ in range(per_common)]
    need = max(0, n_items - len(items))
    # the rest spread evenly over the rare words: each occurs at most ceil(need / 90) times,
    # strictly fewer than a common word
    items += [rare[i % len(rare)] for i in range(need)]
    rng.shuffle(items)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    q = ("Above is a numbered list of words. Some words appear much more often than others. "
         "What are the 10 most common words in the list? Answer with the words only.")
    return Case("cwe", f"Below is a numbered list of words.\n{listing}\n\n{q}", common, 96,
                {"per_common": per_common})


def _summary(words: int, seed: int, depth: float) -> Case:
    body = " ".join(haystack(words, seed))
    q = "Summarize the text above in three sentences."
    return Case("summary", f"{body}\n\n{q}", [], 96)


_BUILDERS: dict[str, Callable[[int, int, float], Case]] = {
    "niah": _niah, "multikey": _multikey, "multivalue": _multivalue, "vartrack": _vartrack, "cwe": _cwe,
    "summary": _summary,
}
# words of haystack per prompt token, per task (the cwe list is ~3 tokens per item)
_WORDS_PER_TOKEN = {"cwe": 0.33}


def build(task: str, target_tokens: int, seed: int, depth: float = 0.5,
          count_tokens: Callable[[str], int] | None = None) -> Case:
    """A ``task`` case of about ``target_tokens`` tokens (within ~3% when ``count_tokens`` is given)."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if target_tokens < 64:
        raise ValueError(f"target_tokens must be >= 64, got {target_tokens}")
    words = max(20, int(target_tokens * _WORDS_PER_TOKEN.get(task, 0.7)))
    case = _BUILDERS[task](words, seed, depth)
    if count_tokens is not None:
        # tokens are ~affine in words (fixed needles + question): secant steps on the slope
        slope = 1 / _WORDS_PER_TOKEN.get(task, 0.7)  # tokens per word, first guess
        prev = None
        best = (abs(count_tokens(case.prompt) - target_tokens), case)
        for _ in range(8):
            n = count_tokens(case.prompt)
            best = min(best, (abs(n - target_tokens), case), key=lambda x: x[0])
            if abs(n - target_tokens) <= 0.02 * target_tokens:
                break
            if prev is not None and prev[0] != words and prev[1] != n:
                slope = max(0.2, (n - prev[1]) / (words - prev[0]))
            prev = (words, n)
            step = round((target_tokens - n) / slope)
            words = max(20, words + (step or (1 if target_tokens > n else -1)))
            case = _BUILDERS[task](words, seed, depth)
        n = count_tokens(case.prompt)
        if abs(n - target_tokens) > best[0]:
            case = best[1]
        case.meta["prompt_tokens"] = count_tokens(case.prompt)
    case.meta.update(target_tokens=target_tokens, seed=seed)
    return case


def score(case: Case, output: str) -> float:
    """Share of ``case.answers`` found in ``output`` (case-insensitive, whole tokens); summaries: n/a."""
    if case.task == "summary":
        raise ValueError("summaries are scored against the full-KV summary: use rouge_l")
    found = set(re.findall(r"[A-Za-z0-9]+", output.lower()))
    return sum(a.lower() in found for a in case.answers) / len(case.answers)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (Lin 2004, beta = 1)."""
    c = re.findall(r"\w+", candidate.lower())
    r = re.findall(r"\w+", reference.lower())
    if not c or not r:
        return float(c == r)
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)
