"""The summarizer's key-name heuristic and sentence de-duplication (no server, no model)."""

from __future__ import annotations

import random
from pathlib import Path

from headkv_sglang.programs.summarize import COMBINE_PROMPT, COMBINE_PROMPT_NAMES, distinct_sentences, instruction_for, \
    join_names, key_names

EXAMPLES = Path(__file__).resolve().parents[1] / "headkv_sglang" / "programs" / "examples"


def test_chronicle_names_are_the_planted_entities():
    text = (EXAMPLES / "harbor_chronicle.txt").read_text()
    assert key_names(text, 10) == ["Port Varenholm", "Saltmere Canal", "Captain Odile Brask"]


def test_sentence_initial_words_count_only_when_also_seen_inside_a_sentence():
    text = ("Rain fell. Rain fell again. The Harbour of Tolm closed. Ships left the Harbour of Tolm. "
            "Ships came back. Mira's boat and Mira met Ossian near Tolm. Ossian waved. Later Ossian slept.")
    # "Rain" and "Ships" only start sentences; "The Harbour of Tolm" drops "The" and matches
    # the mid-sentence one; "Mira's" is Mira; "Later Ossian" counts as Ossian.
    assert key_names(text, 10) == ["Ossian", "Harbour of Tolm", "Mira"]
    assert key_names(text, 10, min_count=1) == ["Ossian", "Harbour of Tolm", "Mira", "Tolm"]
    assert key_names(text, 1) == ["Ossian"]
    assert key_names(text, 0) == []
    assert key_names("", 5) == [] and key_names("no names here at all. none.", 5) == []


def test_frequency_order_on_random_text():
    rng = random.Random(11)
    names = ["Quillon", "Dessa Marr", "Port Ebb", "Hale Institute"]
    counts = {n: c for n, c in zip(names, (9, 6, 4, 1))}
    sentences = [f"the crew met {n} at noon." for n, c in counts.items() for _ in range(c)]
    sentences += ["the crew rested." for _ in range(20)]
    rng.shuffle(sentences)
    text = " ".join("Then " + s for s in sentences)  # every name inside a sentence
    assert key_names(text, 10) == ["Quillon", "Dessa Marr", "Port Ebb"]  # Hale Institute: seen once


def test_instructions_name_what_the_text_contains():
    names = ["Port Varenholm", "Saltmere Canal", "Captain Odile Brask"]
    assert join_names(names[:1]) == "Port Varenholm"
    assert join_names(names) == "Port Varenholm, Saltmere Canal and Captain Odile Brask"
    part = "At Saltmere Canal the crew met Captain Odile Brask."
    assert instruction_for(part, COMBINE_PROMPT, COMBINE_PROMPT_NAMES, names) == COMBINE_PROMPT_NAMES.format(
        names="Saltmere Canal and Captain Odile Brask")
    assert instruction_for(part, COMBINE_PROMPT, COMBINE_PROMPT_NAMES, names, all_names=True) == \
        COMBINE_PROMPT_NAMES.format(names=join_names(names))
    assert instruction_for("nothing here", COMBINE_PROMPT, COMBINE_PROMPT_NAMES, names) == COMBINE_PROMPT


def test_distinct_sentences_drop_loops():
    parts = ["The port opened. The port opened again. Ships sailed to Tolm.",
             "Ships sailed to Tolm. A storm came.\n\nThe port opened."]
    assert distinct_sentences(parts) == ["The port opened. Ships sailed to Tolm.", "A storm came."]
    assert distinct_sentences(["", "  "]) == []
