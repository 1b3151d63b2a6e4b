"""Where a prompt's question is: the queries that score its tokens (question-aware scoring).

SnapKV-style policies rank prompt tokens by the attention the *last* ``w`` prompt queries
put on them. In a chat prompt those last tokens are the template's generation tail
(``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML): with a small window the tokens are
ranked by template queries alone. Question-aware scoring ranks them with the request's
question instead: the last ``n`` tokens of the last user turn, before the template tail.

:class:`QuestionFinder` finds that span in token ids. It learns the template's markers
once from the tokenizer (:meth:`QuestionFinder.from_tokenizer`): the *generation tail*
(what follows a user message when a reply is asked for) and the *user header* (what
precedes a user message). A prompt that does not end with the tail (a raw ``/generate``
prompt) ends its question at its last token; a turn with no header found (raw prompts,
unknown templates) is cut to ``n`` tokens only: the fallback "last N non-template tokens".

Pure Python: no SGLang, no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

logger = logging.getLogger("headkv_sglang")

_SENTINEL = "\u2063HEADKV\u2063QUESTION\u2063"
_OTHER = ("\u2063A1\u2063", "\u2063B2\u2063")


@dataclass(frozen=True)
class QuestionFinder:
    """The chat template's markers as token ids (empty: unknown)."""

    tail: tuple[int, ...] = ()
    header: tuple[int, ...] = ()

    def span(self, ids: Sequence[int], max_queries: int) -> tuple[int, int]:
        """``(start, end)``: the scoring queries are prompt positions ``[start, end)``.

        ``end`` is where the generation tail starts (``len(ids)`` without one); ``start`` is
        ``end - max_queries``, but not before the last user header (the question is the
        last user turn) and at least one token before ``end``.
        """
        n_ids = len(ids)
        if n_ids == 0:
            raise ValueError("an empty prompt has no question")
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        end = n_ids
        t = len(self.tail)
        if t and n_ids > t and tuple(ids[n_ids - t:]) == self.tail:
            end = n_ids - t
        start = max(0, end - max_queries)
        h = len(self.header)
        if h:
            turn = _rfind(ids, self.header, start - h + 1 if start >= h else 0, end)
            if turn >= 0 and turn + h < end:
                start = max(start, turn + h)
        return start, end

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "QuestionFinder":
        """The markers of ``tokenizer``'s chat template (an empty finder if it has none).

        The tail is what the template puts after a user message when a reply is asked for;
        the header is the longest text that precedes the last user message both in a
        one-turn chat and after an assistant turn (with the system prompt, if any, cut off).
        """
        try:
            render = lambda msgs: tokenizer.apply_chat_template(  # noqa: E731
                msgs, tokenize=False, add_generation_prompt=True)
            one = render([{"role": "user", "content": _SENTINEL}])
            two = render([{"role": "user", "content": _OTHER[0]}, {"role": "assistant", "content": _OTHER[1]},
                          {"role": "user", "content": _SENTINEL}])
        except Exception as e:  # no template, or one that refuses these messages
            logger.info("headkv_sglang: no chat template markers (%s); questions are the prompts' last tokens", e)
            return cls()
        if one.count(_SENTINEL) != 1 or two.count(_SENTINEL) != 1:
            return cls()
        tail_text = one.split(_SENTINEL, 1)[1]
        before_one, before_two = one.split(_SENTINEL, 1)[0], two.split(_SENTINEL, 1)[0]
        header_text = _common_suffix(before_one, before_two.split(_OTHER[1], 1)[-1])
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()  # noqa: E731
        return cls(tail=encode(tail_text), header=encode(header_text))


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:] if n else ""


def _rfind(ids: Sequence[int], pattern: tuple[int, ...], lo: int, hi: int) -> int:
    """Start of the last occurrence of ``pattern`` inside ``ids[lo:hi]`` (-1: none)."""
    h = len(pattern)
    first = pattern[0]
    for i in range(hi - h, lo - 1, -1):
        if ids[i] == first and tuple(ids[i:i + h]) == pattern:
            return i
    return -1
