"""Question-aware scoring: finding the question's span in token ids (headkv_sglang/question.py)."""

from __future__ import annotations

import random

import pytest

from headkv_sglang.question import QuestionFinder

TAIL = (2, 198, 1, 520, 9531, 198)
HEADER = (2, 198, 1, 4093, 198)


def naive_span(ids, tail, header, n):
    """The rule, written out: end before the tail, the last n tokens, not before the last user header."""
    end = len(ids) - len(tail) if tail and len(ids) > len(tail) and list(ids[-len(tail):]) == list(tail) else len(ids)
    start = max(0, end - n)
    if header:
        for i in range(end - len(header), -1, -1):
            if list(ids[i:i + len(header)]) == list(header):
                if i + len(header) < end:
                    start = max(start, i + len(header))
                break
    return start, end


@pytest.mark.parametrize("seed", range(40))
def test_span_matches_the_rule_on_random_prompts(seed):
    rng = random.Random(seed)
    body = lambda k: [rng.randrange(3, 40) for _ in range(k)]  # noqa: E731
    ids = body(rng.randrange(0, 30))
    for _ in range(rng.randrange(0, 3)):  # earlier turns
        ids += [*HEADER, *body(rng.randrange(1, 20))]
    if rng.random() < 0.7:
        ids += [*HEADER, *body(rng.randrange(1, 60))]
    if rng.random() < 0.7:
        ids += list(TAIL)
    if not ids:
        ids = [7]
    n = rng.choice([1, 4, 32, 100])
    finder = QuestionFinder(tail=TAIL, header=HEADER)
    start, end = finder.span(ids, n)
    assert (start, end) == naive_span(ids, TAIL, HEADER, n)
    assert 0 <= start < end <= len(ids) and end - start <= n


def test_span_cases_written_out():
    f = QuestionFinder(tail=(8, 9), header=(5, 6))
    # [sys] 5 6 q q q 8 9 -> the question is the three q's
    assert f.span([1, 2, 5, 6, 30, 31, 32, 8, 9], 32) == (4, 7)
    assert f.span([1, 2, 5, 6, 30, 31, 32, 8, 9], 2) == (5, 7)  # at most n tokens
    # no tail (a raw /generate prompt): the question ends with the prompt
    assert f.span([1, 2, 5, 6, 30, 31, 32], 32) == (4, 7)
    # no header: the last n tokens before the tail (the fallback)
    assert f.span(list(range(10, 60)) + [8, 9], 16) == (34, 50)
    # an empty user turn (header right before the tail): keep the last n tokens
    assert f.span([1, 2, 3, 5, 6, 8, 9], 2) == (3, 5)
    # a prompt that is only the tail is its own question
    assert f.span([8, 9], 4) == (0, 2)
    # unknown template: the last n tokens
    assert QuestionFinder().span([1, 2, 3, 4, 5], 3) == (2, 5)
    with pytest.raises(ValueError, match="empty prompt"):
        f.span([], 4)
    with pytest.raises(ValueError, match="max_queries"):
        f.span([1], 0)


def test_markers_of_the_test_models_chat_template(model_path):
    """SmolLM2's ChatML template: the question of a chat prompt is the user's text, before the tail."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    f = QuestionFinder.from_tokenizer(tok)
    assert tok.decode(list(f.tail)) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(list(f.header)) == "<|im_end|>\n<|im_start|>user\n"

    def ids(messages):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out if isinstance(out, list) else out["input_ids"])

    doc = "The lighthouse keeper wrote down every ship. " * 40
    one = ids([{"role": "user", "content": doc + "\n\nWhich ship came last? Answer briefly."}])
    s, e = f.span(one, 32)
    assert e == len(one) - len(f.tail) and e - s == 32
    assert tok.decode(one[s:e]).endswith("Which ship came last? Answer briefly.")
    # a short follow-up turn: only that turn scores, not the document before it
    two = ids([{"role": "user", "content": doc}, {"role": "assistant", "content": "Noted."},
               {"role": "user", "content": "Who kept the lighthouse?"}])
    s, e = f.span(two, 32)
    assert tok.decode(two[s:e]) == "Who kept the lighthouse?"


class _NoTemplate:
    def apply_chat_template(self, *a, **k):
        raise ValueError("this tokenizer has no chat template")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_a_tokenizer_without_template_gives_the_fallback():
    f = QuestionFinder.from_tokenizer(_NoTemplate())
    assert f == QuestionFinder()
    assert f.span(list(range(100)), 32) == (68, 100)


def test_config_scoring_span_is_the_question_or_the_window():
    """``KVPolicyConfig.scoring_span``, the one rule the server and ``benchmarks/kept_tokens.py``
    use: the question by default, SnapKV's last ``obs_window`` tokens with ``scoring="window"``
    (over ``seq_len``, which counts a retracted request's outputs too)."""
    from headkv_sglang.config import KVPolicyConfig

    finder = QuestionFinder(tail=(9, 8), header=(7,))
    ids = [1, 7, 2, 3, 4, 5, 6, 9, 8]
    cfg = KVPolicyConfig(policy="snapkv", budget=40)
    assert cfg.scoring_span(finder, ids, len(ids)) == (2, 7) == finder.span(ids, cfg.question_len)
    assert KVPolicyConfig(policy="snapkv", budget=40, question=2).scoring_span(finder, ids, len(ids)) == (5, 7)
    window = KVPolicyConfig(policy="snapkv", budget=40, scoring="window")  # obs_window 10
    assert window.scoring_span(finder, ids, len(ids)) == (0, 9)
    assert window.scoring_span(finder, ids, 30) == (20, 30)
