"""Many questions of different shapes over one document: full KV, a compressed copy per
request, and one shared compressed copy (``kv_share``) per scoring; NVIDIA kvpress is the
peer (``benchmarks/kvpress_peer.py``, run outside the server).

    python benchmarks/multi_question.py --out benchmarks/results/multi_question_cpu
    python benchmarks/multi_question.py --shared-scorings window self reconstruct --budgets 5% 10% 25%
    python benchmarks/multi_question.py --server http://127.0.0.1:30000 --model-path DIR   # an existing server
    python benchmarks/multi_question.py --report-only --peer benchmarks/results/multi_question_kvpress_cpu.json

Each document (``--docs``, ~``--doc-tokens`` tokens of prose from ``pydoc_data``) holds
``--facts`` facts of different shapes, one of each (a person's name, a number, a town, a
date, a colour, an animal; :data:`SHAPES`), spread evenly through it; each fact is asked
by its own request, in a chat turn that starts with the document (the document's tokens are
a prefix of every question's prompt). ``benchmarks/shared_document.py`` asks same-shaped
facts (magic numbers); here every answer has another shape, as in long-document QA.

Per document and budget, after a cache flush (``shared_document.run_config``):

* ``full``: the questions at once (SGLang's radix tree shares the document's full KV);
* ``<policy> per request``: each request compresses its own copy, ranked by its question;
* ``<policy> shared <scoring>``: the document alone first (``max_new_tokens: 0``,
  ``kv_share``, ``kv_scoring`` = each of ``--shared-scorings``), then the questions read its
  one compressed copy. A scoring the server answers with HTTP 400 is reported as "not
  supported by this server" and the run goes on.

Measured: right answers (every part of the fact's answer in the output, :func:`correct`),
the KV the server held once every question decodes (``/server_info``: token-pool slots
outside the radix tree's evictable cache + the compressed pool's used pages), and
compression time (``compress_ms`` of the server's per-request reports, summed over the
compressions the configuration ran; for a shared copy, which the server does not report, the
document request's wall time). Writes ``OUT.json`` (every answer), ``OUT.md`` and
``OUT.png``; with ``--peer FILE.json`` (``kvpress_peer.py``'s output on the same cases) its
rows join the table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headkv_sglang.dev.haystack import haystack  # noqa: E402

# common, short names: the test model garbles rare surnames even with full KV
FIRST = ["Anna", "Peter", "Maria", "David", "Laura", "Thomas", "Emma", "George", "Sofia", "Henry", "Clara", "Oscar"]
LAST = ["Miller", "Carter", "Brooks", "Turner", "Fisher", "Walker", "Parker", "Hughes", "Foster", "Morgan", "Bennett",
        "Reed"]
SHIPS = ["Northern Star", "Sea Lark", "Iron Gull", "Silver Heron", "Red Comet", "Morning Tide", "Blue Otter",
         "Storm Petrel"]
VAULTS = ["Granite", "Harbor", "Copper", "Ridge", "Willow", "Summit", "Lantern", "Meadow"]
TOWNS = ["Lisbon", "Tromso", "Cusco", "Hobart", "Zanzibar", "Reykjavik", "Valparaiso", "Kyoto", "Marrakesh",
         "Tbilisi", "Salzburg", "Cartagena", "Dubrovnik", "Winnipeg", "Mandalay", "Galway"]
FESTIVALS = ["lantern", "kite", "cheese", "harp", "pumpkin", "glass", "salt", "tulip"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TREATIES = ["Elmsford", "Carrow", "Dunmere", "Ashby", "Westvale", "Brindle", "Harrowgate", "Kestrel"]
COLORS = ["green", "purple", "orange", "yellow", "red", "blue", "brown", "pink", "white", "black"]
HOUSES = ["Ashford", "Harper", "Sutton", "Galloway", "Whitaker", "Prescott", "Radcliffe", "Holloway"]
ANIMALS = ["parrot", "tortoise", "ferret", "hedgehog", "goat", "peacock", "llama", "rabbit", "donkey", "owl"]
FAMILIES = ["Brennan", "Castillo", "Dalton", "Everly", "Fontaine", "Grayson", "Hargrove", "Ingram"]


@dataclass(frozen=True)
class Fact:
    shape: str  # "name", "number", "town", "date", "color", "animal"
    sentence: str  # planted in the document
    question: str  # the request's user question (after the document)
    answer: str  # the expected answer, as written in the sentence
    parts: tuple[str, ...]  # every one must appear in the output (case-insensitive, whole words)


def _name(rng: random.Random) -> Fact:
    ship, first, last = rng.choice(SHIPS), rng.choice(FIRST), rng.choice(LAST)
    return Fact("name", f"The captain of the ship {ship} is a sailor named {first} {last}.",
                f"What is the name of the captain of the ship {ship}? Answer with the name only.",
                f"{first} {last}", (last,))


def _number(rng: random.Random) -> Fact:
    vault, n = rng.choice(VAULTS), str(rng.randrange(10_000, 99_999))
    return Fact("number", f"The secret code of the {vault} vault is {n}.",
                f"What is the secret code of the {vault} vault? Answer with the number only.", n, (n,))


def _town(rng: random.Random) -> Fact:
    fest, town = rng.choice(FESTIVALS), rng.choice(TOWNS)
    return Fact("town", f"The famous {fest} festival is held every year in the town of {town}.",
                f"In which town is the famous {fest} festival held? Answer with the town only.", town, (town,))


def _date(rng: random.Random) -> Fact:
    treaty, month, day, year = rng.choice(TREATIES), rng.choice(MONTHS), rng.randrange(2, 29), rng.randrange(1620, 1890)
    d = f"{month} {day}, {year}"
    return Fact("date", f"The Treaty of {treaty} was signed on {d}.",
                f"On what date was the Treaty of {treaty} signed? Answer with the date only.", d,
                (month, str(day), str(year)))


def _color(rng: random.Random) -> Fact:
    house, color = rng.choice(HOUSES), rng.choice(COLORS)
    return Fact("color", f"The front door of the {house} house is painted {color}.",
                f"What color is the front door of the {house} house? Answer with the color only.", color, (color,))


def _animal(rng: random.Random) -> Fact:
    fam, animal = rng.choice(FAMILIES), rng.choice(ANIMALS)
    return Fact("animal", f"The pet of the {fam} family is a {animal}.",
                f"What animal is the pet of the {fam} family? Answer with the animal only.", animal, (animal,))


#: one generator per shape; a document holds at most one fact of each
SHAPES = {"name": _name, "number": _number, "town": _town, "date": _date, "color": _color, "animal": _animal}


@dataclass(frozen=True)
class Case:
    seed: int
    text: str  # the document: prose with the facts planted in it
    facts: tuple[Fact, ...]


def facts_for(n_facts: int, seed: int) -> tuple[Fact, ...]:
    """``n_facts`` facts of pairwise different shapes, their shapes and order drawn by ``seed``."""
    if not 1 <= n_facts <= len(SHAPES):
        raise ValueError(f"n_facts must be in 1..{len(SHAPES)} (one fact per shape), got {n_facts}")
    rng = random.Random(seed)
    shapes = rng.sample(sorted(SHAPES), n_facts)
    return tuple(SHAPES[s](rng) for s in shapes)


def plant(sents: list[str], facts: tuple[Fact, ...]) -> str:
    """The sentences with the facts inserted evenly through them (fact i at depth (i+0.5)/n)."""
    out = list(sents)
    for i, f in reversed(list(enumerate(facts))):
        out.insert(round((i + 0.5) / len(facts) * len(out)), f.sentence)
    return " ".join(out)


def case(count_tokens, n_tokens: int, n_facts: int, seed: int) -> Case:
    """A document of about ``n_tokens`` tokens (``count_tokens(text) -> int``; within 2%
    after a few corrections) holding ``n_facts`` facts of different shapes."""
    facts = facts_for(n_facts, seed)
    words = int(n_tokens * 0.72)
    for _ in range(6):
        text = plant(haystack(words, 1000 + seed), facts)
        got = count_tokens(text)
        if abs(got - n_tokens) <= 0.02 * n_tokens:
            break
        words = max(50, round(words * n_tokens / got))
    return Case(seed, text, facts)


def correct(fact: Fact, output: str) -> bool:
    """Every part of the fact's answer appears in ``output`` as a whole word, any case
    ("March 14, 1857" is right as "14 March 1857"; "Lisbon." as "lisbon")."""
    return all(re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", output, re.IGNORECASE) for p in fact.parts)


def configs(policies: str | list[str], budget: str, scorings: list[str]) -> list[tuple[str, dict, bool]]:
    """(name, per-request params, shared) at one budget: ``full`` first, then for each policy a
    copy per request (its oracle: ranked by each question's own attention) and a shared copy
    per scoring."""
    out = [("full", {"kv_policy": "full"}, False)]
    for policy in [policies] if isinstance(policies, str) else policies:
        base = {"kv_policy": policy, "kv_budget": budget}
        out.append((f"{policy} per request", {**base, "kv_scoring": "question"}, False))
        out += [(f"{policy} shared {s}", {**base, "kv_share": True, **shared_params(s)}, True) for s in scorings]
    return out


def shared_params(scoring: str) -> dict:
    """A ``--shared-scorings`` entry's request keys: ``SCORING`` or, for a question-agnostic one,
    ``SCORING:SELECT`` (``kv_agnostic_select``: ``reconstruct:global``)."""
    name, _, select = scoring.partition(":")
    return {"kv_scoring": name, **({"kv_agnostic_select": select} if select else {})}


def check_scoring(scoring: str) -> str | None:
    """Why a ``--shared-scorings`` entry is not one, or None."""
    from headkv_sglang.config import AGNOSTIC_SCORINGS, AGNOSTIC_SELECT_CHOICES, SCORING_CHOICES

    name, colon, select = scoring.partition(":")
    if name not in SCORING_CHOICES:
        return f"{scoring!r}: the scoring is one of {', '.join(SCORING_CHOICES)}"
    if colon and (name not in AGNOSTIC_SCORINGS or select not in AGNOSTIC_SELECT_CHOICES):
        return (f"{scoring!r}: only {' / '.join(AGNOSTIC_SCORINGS)} take a selection, one of "
                f"{', '.join(AGNOSTIC_SELECT_CHOICES)} (reconstruct:global)")
    return None


def not_supported(err: BaseException) -> str | None:
    """The server's reason when ``err`` is its HTTP 400 refusal of a request's parameters (as
    the status of the response or, streamed, in its first chunk), else None."""
    from benchmarks.shared_document import RequestError

    if isinstance(err, RequestError):
        return err.message[:300] if err.code == 400 else None
    if isinstance(err, urllib.error.HTTPError) and err.code == 400:
        try:
            return err.read().decode(errors="replace")[:300]
        except OSError:
            return "HTTP 400"
    return None


def run(url: str, a, tok, token_bytes: int) -> dict:
    from tqdm import tqdm

    from benchmarks.shared_document import RequestError, chat_prompts, flush, run_config

    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    cases = [case(count, a.doc_tokens, a.facts, a.seed + i) for i in range(a.docs)]
    res: dict = {"cases": [asdict(c) for c in cases], "runs": []}
    grid = [(b, c) for b in a.budgets for c in cases]
    bar = tqdm(total=len(grid) * (1 + len(a.policies) * (1 + len(a.shared_scorings))), desc="configurations", disable=a.no_progress)
    unsupported: dict[str, str] = {}
    full_done: dict[int, dict] = {}
    for budget, c in grid:
        doc, qs = chat_prompts(tok, c.text, [f.question for f in c.facts])
        for name, params, shared in configs(a.policies, budget, a.shared_scorings):
            bar.update()
            row = {"budget": budget, "seed": c.seed, "config": name, "params": params, "doc_tokens": len(doc)}
            if name == "full" and c.seed in full_done:  # full KV does not depend on the budget
                res["runs"].append({**full_done[c.seed], "budget": budget, "reused": True})
                continue
            if params.get("kv_scoring") in unsupported:
                res["runs"].append({**row, "not_supported": unsupported[params["kv_scoring"]]})
                continue
            try:
                r = run_config(url, doc, qs, params, shared, a.max_tokens, token_bytes)
            except (urllib.error.HTTPError, RequestError) as e:
                why = not_supported(e)
                if why is None:
                    raise
                unsupported[params.get("kv_scoring", name)] = why
                res["runs"].append({**row, "not_supported": why})
                flush(url)
                continue
            r["right"] = [correct(f, t) for f, t in zip(c.facts, r["texts"])]
            res["runs"].append({**row, **r})
            if name == "full":
                full_done[c.seed] = res["runs"][-1]
            a.checkpoint(res)
    bar.close()
    flush(url)
    return res


def summary(res: dict, peer: dict | None = None) -> list[dict]:
    """One row per (budget, configuration): right answers, KV held decoding (summed over the
    documents, which ran one after another), compression time; the peer's rows after the server's
    of the same budget."""
    rows: dict[tuple[str, str], dict] = {}
    for r in res["runs"]:
        s = rows.setdefault((r["budget"], r["config"]), {
            "budget": r["budget"], "config": r["config"], "right": 0, "asked": 0, "held": 0, "full_held": 0,
            "compress_ms": 0.0, "compressions": 0, "doc_seconds": 0.0, "not_supported": None, "source": "server"})
        if "not_supported" in r:
            s["not_supported"] = r["not_supported"]
            continue
        s["right"] += sum(r["right"])
        s["asked"] += len(r["right"])
        s["held"] += r["decode_held"]["bytes"]
        s["compress_ms"] += sum(r.get("compress_ms", []))
        s["compressions"] += r["compressions"]
        s["doc_seconds"] += r.get("doc_seconds") or 0.0
    full = {b: s for (b, n), s in rows.items() if n == "full"}
    for (b, _), s in rows.items():
        s["full_held"] = full[b]["held"] if b in full else 0
    out = list(rows.values())
    for r in (peer or {}).get("rows", []):
        out.append({**r, "source": "kvpress"})
    # by budget (in the order the budgets first appear), the server's rows before the peer's
    order = {b: i for i, b in reversed(list(enumerate(r["budget"] for r in out)))}
    return sorted(out, key=lambda r: order[r["budget"]])


def markdown(res: dict, meta: dict) -> str:
    peer = meta.get("peer")
    rows = summary(res, peer)
    cases = res["cases"]
    shapes = sorted({f["shape"] for c in cases for f in c["facts"]})
    lines = [
        f"# Many questions over one document: {len(cases)} documents x {len(cases[0]['facts'])} facts "
        f"of different shapes, ~{meta['doc_tokens']} tokens",
        "",
        f"Machine: {meta['machine']}. Model: {meta['model']}. Command: `{meta['command']}`.",
        "",
        f"Fact shapes: {', '.join(shapes)} (one of each per document at most; every question a separate request "
        f"over the same document). Greedy answers, {meta['max_tokens']} tokens at most; an answer is right when "
        "every part of the fact (a date's month, day and year) is in it. *KV held decoding*: the most the server "
        "held once every question's prefill was done (token-pool slots outside the radix tree's evictable cache + "
        "compressed pages), summed over the documents (they ran one after another); *vs full* against full KV "
        "(radix-shared) at the same budget. *Compression*: the server's `compress_ms` (`/server_info`'s "
        "per-request reports), summed over the compressions the configuration ran (one per question; one per "
        "document for a shared copy, reported when it is published): scoring, selection and writing the pages, "
        "not the prefill. A reconstructed document also prefills its copy (about as many tokens again: "
        "`reconstruction_tokens`); an older server that reports nothing for a shared copy is shown with the "
        "document request's wall time. Times are wall-clock on a shared 2-core machine, for comparison within "
        "one run only.",
    ]
    if peer:
        lines += ["", f"kvpress rows: `{peer['command']}` ({peer['machine']}; kvpress {peer['kvpress']}, "
                  f"torch {peer['torch']}, transformers {peer['transformers']}, dtype {peer['dtype']}), the same "
                  "documents and prompt tokens, outside the server, the document compressed once without the "
                  "question and every question decoded from it. *KV held* there: the bytes of the cache tensors "
                  "at the server's dtype (KVzip's and AdaKV's presses mask pruned keys and free nothing); "
                  "*kept*: the share of the document's (layer, head, token) entries left unmasked. "
                  "*Compression*: prefill + compression of the document, minus the same prefill without a press."]
    lines += ["", "*vs oracle*: a shared copy's right answers against the same policy's copy per request at the same "
              "budget (the same selection ranked by each question's own attention, the most a question-agnostic "
              "ranking could keep).",
              "", "| budget | configuration | right answers | vs full | vs oracle | KV held decoding | vs full "
              "| compression |", "|---|---|---|---|---|---|---|---|"]
    # each runtime against its own full KV (the server's, kvpress's)
    full_right = {(r["source"], r["budget"]): r["right"] for r in rows if r["config"] in ("full", "kvpress full")}
    oracle = {(r["budget"], r["config"].removesuffix(" per request")): r["right"] for r in rows
              if r["source"] == "server" and r["config"].endswith(" per request") and not r["not_supported"]}
    for r in rows:
        if r["not_supported"]:
            lines.append(f"| {r['budget']} | {r['config']} | not supported by this server | | | | | |")
            continue
        orc = oracle.get((r["budget"], r["config"].split(" shared ")[0])) if " shared " in r["config"] else None
        vs_oracle = f"{r['right'] / orc:.0%}" if orc else "-" if orc is not None else ""
        fr = full_right.get((r["source"], r["budget"]), 0)
        held = f"{r['held'] / 2**20:.1f} MB"
        if r["source"] == "kvpress":
            held += f" (kept {r['kept']:.0%})"
        comp = "" if r["config"] in ("full", "kvpress full") else (
            f"{r['compress_ms'] / 1000:.2f} s" + (f" ({r['compressions']}x)" if r["compressions"] else ""))
        if r["source"] == "server" and r["config"] != "full" and not r["compress_ms"] and r.get("doc_seconds"):
            comp = f"not reported; document request {r['doc_seconds']:.1f} s ({r['compressions']}x)"
        vs = f"{r['right'] / fr:.0%}" if fr else "-"
        lines.append(f"| {r['budget']} | {r['config']} | {r['right']}/{r['asked']} | {vs} | {vs_oracle} "
                     f"| {held} | {r['held'] / max(r['full_held'], 1):.1%} | {comp} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: str, peer: dict | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary(res, peer) if not r["not_supported"] and r["asked"]]
    names = [f"{r['budget']} {r['config']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * len(rows) + 1.6))
    colors = ["#888" if "full" in r["config"] else "#9467bd" if r["source"] == "kvpress"
              else "#d62728" if "per request" in r["config"] else "#2ca02c" for r in rows]
    ax1.barh(names, [r["held"] / 2**20 for r in rows], color=colors)
    ax1.set_xlabel("KV held while the questions decode (MB, all documents)")
    ax1.invert_yaxis()
    ax2.barh(names, [r["right"] / r["asked"] for r in rows], color=colors)
    ax2.set_xlabel("right answers (share)")
    ax2.set_xlim(0, 1)
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle("Questions of different shapes over one document (grey: full KV, red: per request, "
                 "green: shared, purple: kvpress)", fontsize=9)
    fig.tight_layout()
    path = f"{out}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: str, meta: dict, res: dict) -> None:
    peer = meta.get("peer")
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "results": res, "summary": summary(res, peer)},
                                              indent=1))
    Path(f"{out}.md").write_text(markdown(res, meta))
    plot(res, out, peer)


def load_peer(paths: list[str]) -> dict:
    """``kvpress_peer.py``'s outputs as one: the rows of every file, the commands joined. The runs
    must agree on what they ran (kvpress, torch, transformers, dtype, machine)."""
    peers = [json.loads(Path(x).read_text()) for x in paths]
    keys = ("machine", "kvpress", "torch", "transformers", "dtype")
    for x, other in zip(paths[1:], peers[1:]):
        diff = [k for k in keys if other.get(k) != peers[0].get(k)]
        if diff:
            raise SystemExit(f"--peer {x}: its {', '.join(diff)} differ from {paths[0]}'s")
    return {**peers[0], "command": "; ".join(x["command"] for x in peers),
            "rows": [r for x in peers for r in x["rows"]]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=None, help="an existing --kv-policy server (default: start one)")
    p.add_argument("--model-path", default=None, help="the served model's directory (default: the test model)")
    p.add_argument("--port", type=int, default=None, help="the started server's port (default: a free one)")
    p.add_argument("--docs", type=int, default=2, help="documents (seeds --seed, --seed+1, ...)")
    p.add_argument("--facts", type=int, default=4, help=f"facts per document, one per shape (at most {len(SHAPES)})")
    p.add_argument("--doc-tokens", type=int, default=2000, help="document length in tokens (2k-8k)")
    p.add_argument("--budgets", nargs="+", default=["10%"], help="kv_budget of the compressed configurations")
    p.add_argument("--policies", nargs="+", default=["snapkv"],
                   help="the compressing policies (each: a copy per request and a shared copy per scoring)")
    p.add_argument("--shared-scorings", nargs="+", default=["window", "self", "reconstruct"],
                   help="kv_scoring of the shared copy, one configuration each; a question-agnostic one may "
                        "name its kv_agnostic_select (reconstruct:global, reconstruct:policy)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="the test model answers in a sentence that restates the question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", nargs="+", default=None,
                   help="kvpress_peer.py's JSON(s) on the same cases (e.g. one per budget): their rows join the table")
    p.add_argument("--out", default="benchmarks/results/multi_question_cpu")
    p.add_argument("--report-only", action="store_true",
                   help="no server: rebuild OUT.md/.png/.json from OUT.json (with --peer: adding its rows)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    for flag, v in (("--docs", a.docs), ("--doc-tokens", a.doc_tokens), ("--max-tokens", a.max_tokens)):
        if v < 1:
            p.error(f"{flag}: invalid value {v}; expected a positive integer")
    for scoring in a.shared_scorings:
        why = check_scoring(scoring)
        if why:
            p.error(f"--shared-scorings: {why}")
    if not 1 <= a.facts <= len(SHAPES):
        p.error(f"--facts: invalid value {a.facts}; expected 1..{len(SHAPES)} (one fact per shape)")
    if a.report_only:
        saved = json.loads(Path(f"{a.out}.json").read_text())
        meta = saved["meta"]
        if a.peer:
            meta["peer"] = load_peer(a.peer)
        write(a.out, meta, saved["results"])
        return 0
    from transformers import AutoTokenizer

    from benchmarks.long_outputs import token_bytes
    from benchmarks.niah import machine
    from headkv_sglang.config import ModelShape
    from headkv_sglang.dev import models
    from headkv_sglang.dev.server import SGLangServer
    from benchmarks.shared_document import SERVER_ARGS

    mdir = Path(a.model_path) if a.model_path else models.model_dir()
    shape = ModelShape.from_model_path(mdir)
    tok = AutoTokenizer.from_pretrained(mdir)
    meta = {"machine": machine(), "model": mdir.name, "max_tokens": a.max_tokens, "doc_tokens": a.doc_tokens,
            "command": "python benchmarks/multi_question.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.peer:
        meta["peer"] = load_peer(a.peer)
    a.checkpoint = lambda res: Path(f"{a.out}.partial.json").write_text(json.dumps(res, indent=1))
    srv = None
    try:
        if a.server is None:
            srv = SGLangServer(mdir, SERVER_ARGS, port=a.port, log_path=f"{a.out}.server.log").start()
        url = a.server or srv.url
        meta["token_bytes"] = token_bytes(url, shape)
        res = run(url, a, tok, meta["token_bytes"])
    finally:
        if srv is not None:
            srv.stop()
    write(a.out, meta, res)
    Path(f"{a.out}.partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
