"""Needle-in-a-haystack prompts from natural English text that ships with Python.

``pydoc_data.topics`` holds ~65k words of the Python reference manual; it needs no
download and is the same on every machine, so prompts are reproducible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    # Drop code-heavy fragments: a haystack should read as prose.
    return tuple(s for s in sents if 40 <= len(s) <= 400 and s.count("(") < 3 and ">>>" not in s)


@dataclass(frozen=True)
class Needle:
    prompt: str  # the user message: haystack with the needle, then the question
    answer: str  # the expected short answer
    depth: float  # where the needle sits, 0 = start, 1 = end
    words: int


def haystack(n_words: int, seed: int = 0) -> list[str]:
    """Consecutive prose sentences totalling about ``n_words`` words, from a seeded offset."""
    sents = _sentences()
    rng = random.Random(seed)
    i = rng.randrange(len(sents))
    out: list[str] = []
    count = 0
    while count < n_words:
        s = sents[i % len(sents)]
        out.append(s)
        count += len(s.split())
        i += 1
    return out


def needle_prompt(n_words: int, depth: float, seed: int = 0) -> Needle:
    """A haystack of ~``n_words`` words with a secret number planted at ``depth``.

    ~0.75 words per token for this text with a Llama tokenizer: 1500 words ≈ 2k tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed * 7919 + int(depth * 1000))
    number = str(rng.randrange(10_000, 99_999))
    sents = haystack(n_words, seed)
    fact = f"The secret number is {number}."
    sents.insert(round(depth * len(sents)), fact)
    body = " ".join(sents)
    question = "What is the secret number? Answer with the number only."
    return Needle(prompt=f"{body}\n\n{question}", answer=number, depth=depth, words=n_words)
