"""Generate the example inputs under headkv_sglang/programs/examples/ (deterministic; run to refresh).

    python -m headkv_sglang.programs.examples.make_examples

Documents are generated from templates about fictional organisations, so every fact is
known and can be planted: ``orbital_report.txt`` (~2k tokens, 4 planted facts, questions
in ``orbital_questions.txt`` and answers in ``orbital_answers.json``),
``harbor_chronicle.txt`` (longer than the test model's 8k-token context, for map-reduce
summaries) and ``docs.jsonl`` (20 short reports for the batch job).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

_SUBJECTS = ["The survey team", "The harbour council", "A visiting inspector", "The night shift",
             "The finance office", "A local historian", "The maintenance crew", "The regional board",
             "An outside auditor", "The training school", "The logistics group", "The weather station"]
_VERBS = ["reviewed", "recorded", "questioned", "revised", "documented", "compared", "measured",
          "summarised", "postponed", "approved", "tested", "catalogued"]
_OBJECTS = ["the quarterly schedule", "the cargo manifests", "the safety drills", "the supplier contracts",
            "the tide tables", "the storage inventory", "the staff rota", "the fuel accounts",
            "the dockside cranes", "the archive of old permits", "the radio logs", "the ferry timetable"]
_TAILS = ["without finding any serious problem.", "and asked for a second opinion.",
          "after a long discussion in the main hall.", "because the previous figures were incomplete.",
          "and published the results a week later.", "while the weather stayed calm.",
          "with help from two volunteers.", "before the end of the month.",
          "and noted several small delays.", "at the request of the regional office."]


def filler(rng: random.Random, n_sentences: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n_sentences)]


def plant(sentences: list[str], facts: list[tuple[float, str]]) -> str:
    out = list(sentences)
    for depth, fact in sorted(facts, reverse=True):
        out.insert(round(depth * len(out)), fact)
    paras = [" ".join(out[i:i + 6]) for i in range(0, len(out), 6)]
    return "\n\n".join(paras) + "\n"


QA_FACTS = [
    (0.1, "Halvorsen Orbital was founded in the year 1987.", "In which year was Halvorsen Orbital founded?", "1987"),
    (0.35, "Halvorsen Orbital employs exactly 4312 people.", "How many people does Halvorsen Orbital employ?", "4312"),
    (0.6, "The flagship satellite of Halvorsen Orbital weighs 731 kilograms.",
     "How many kilograms does the flagship satellite of Halvorsen Orbital weigh?", "731"),
    (0.85, "The secret launch code of Halvorsen Orbital is 58213.",
     "What is the secret launch code of Halvorsen Orbital?", "58213"),
]

CHRONICLE_ENTITIES = ["Port Varenholm", "Captain Odile Brask", "the Saltmere Canal"]


def main() -> None:
    rng = random.Random(2410)
    report = plant(filler(rng, 150), [(d, f) for d, f, _, _ in QA_FACTS])
    (HERE / "orbital_report.txt").write_text("Annual report of Halvorsen Orbital\n\n" + report)
    (HERE / "orbital_questions.txt").write_text("\n".join(q for _, _, q, _ in QA_FACTS) + "\n")
    (HERE / "orbital_answers.json").write_text(json.dumps({q: a for _, _, q, a in QA_FACTS}, indent=2) + "\n")

    # ~9.5k tokens: past SmolLM2's 8192-token context, so summarize takes the map-reduce path.
    town, captain, canal = CHRONICLE_ENTITIES
    templates = [f"{captain} guided the ships of {town} through {canal} in the season of year {{y}}.",
                 f"In year {{y}} the people of {town} celebrated the return of {captain}.",
                 f"Trade through {canal} made {town} rich in year {{y}}, the merchants said.",
                 f"{captain} wrote in year {{y}} that {canal} was the heart of {town}."]
    facts = [(i / 60, templates[i % 4].format(y=1801 + i)) for i in range(60)]
    chronicle = plant(filler(rng, 700), facts)
    (HERE / "harbor_chronicle.txt").write_text(f"A chronicle of {town}\n\n{chronicle}")

    towns = ["Aldmoor", "Brisk Hollow", "Cindervale", "Dunmere", "Eastwick", "Fallowby", "Grimsay", "Harrowgate",
             "Ivybridge", "Jorvale", "Kettlewell", "Larkspur", "Millbrook", "Northam", "Oakhurst", "Pennrith",
             "Quarry End", "Redwater", "Stonebury", "Thornbury"]
    with open(HERE / "docs.jsonl", "w") as f:
        for i, t in enumerate(towns):
            body = plant(filler(rng, 30), [(0.0, f"This is the monthly report of the {t} ferry company."),
                                            (0.5, f"The {t} ferry company carried {1000 + 37 * i} passengers.")])
            f.write(json.dumps({"id": f"doc-{i:02d}", "title": f"{t} ferry report", "text": body}) + "\n")
    print(f"wrote examples to {HERE}")


if __name__ == "__main__":
    main()
