"""Summarize a document on the compressed cache: single pass, map-reduce, or refine.

* ``single`` — the whole document in one prompt (what ``--kv-policy`` compresses);
  chosen by ``auto`` when the document fits the model's context.
* ``map-reduce`` — token-aware chunks summarized in parallel (``run_batch``), then the
  partial summaries combined; recursive while the combined text still does not fit.
  ``auto`` takes it when the document does not fit.
* ``refine`` — chunk by chunk, each step rewriting the running summary with the next chunk.

Key names: a 135M model's summaries drift to generic text ("a local historian ...") and
drop the document's names; its reduce step did so even on a full KV, where it copied
whichever partial summary looped the most. So before any call the document's most
frequent proper names are counted (capitalized phrases inside sentences, seen at least
twice: people, places, ships, organisations; :func:`key_names`, no model call), and the
top ``--key-names`` (default 5) go into the instructions: "... a short summary of this
document about Port Varenholm, Saltmere Canal and Captain Odile Brask". A chunk's call
names those the chunk contains; the final reduce step and each refine step name all of
them (earlier summaries may have lost some) and ask for a summary that names them. The
names sit at the end of the prompt, inside the observation window that compression
always keeps. The reduce step also sees each distinct sentence of the partial summaries
once (near-duplicates, the loops a small model writes, are dropped). ``--key-names 0``
gives the plain instructions.

    python -m headkv_sglang.programs.summarize --doc headkv_sglang/programs/examples/harbor_chronicle.txt \\
        [--mode auto|single|map-reduce|refine] [--kv-policy headkv --kv-budget 128] [--server URL]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import sglang as sgl

from headkv_sglang.programs.endpoint import KVEndpoint, fmt_bytes

# Measured with the test model: asking for the title keeps the summary on the document's
# subject under compression ("Summarize the text above" drifted off-topic at 5% of the KV).
SUMMARY_PROMPT = "Write a short summary of this document. Start with its title."
PART_PROMPT = "Write a short summary of this part of a document. Name the people and places in it."
COMBINE_PROMPT = ("These are summaries of consecutive parts of one document. Write one short summary of the "
                  "whole document. Name the people and places in it.")
# With key names ({names}: "A, B and C"). Measured on the 12k-token chronicle with headkv at
# 128 and 512 tokens/head: "... about {names}" made every chunk summary name them (the plain
# PART_PROMPT: 0-3 of 6), and the reduce step names them when the instruction repeats them.
SUMMARY_PROMPT_NAMES = "Write a short summary of this document about {names}. Start with its title."
PART_PROMPT_NAMES = "Write a short summary of this part of a document about {names}."
COMBINE_PROMPT_NAMES = ("These are summaries of consecutive parts of one document about {names}. Write one "
                        "short summary of the whole document that names {names}.")
DEFAULT_CHUNK_TOKENS = 2048
REFINE_PROMPT = ("Here is a summary of the first part of a document:\n{summary}\n\nHere is the next part:\n{chunk}\n\n"
                 "Rewrite the summary so that it covers both parts, in a few sentences. "
                 "Name the main people, places and organisations.")
REFINE_NAMES = " The document is about {names}: name them."
DEFAULT_KEY_NAMES = 5
# Room for the chat template and the instruction (key names included) around a chunk, in tokens.
PROMPT_OVERHEAD = 128

# A capitalized word with a lower-case letter (not "I", not an acronym alone), and phrases
# of them, joined by a few lower-case particles ("Bank of England", "Ludwig van Beethoven").
_CAP = r"[A-Z][A-Za-z'\u2019-]*[a-z][A-Za-z'\u2019-]*"
_NAME = re.compile(rf"{_CAP}(?:[ \t]+(?:(?:of|de|la|le|van|von|der|du|da|del|al|bin|the)[ \t]+)?{_CAP})*")
# what precedes a sentence-initial word: . ! ? : ; (and closing quotes/brackets) then a
# space, or a line start (titles, headings, list items)
_SENTENCE_START = re.compile(r"(?:[.!?:;]['\"\u2019\u201d)\]]*\s+|\n[ \t]*(?:[-*#>]+[ \t]*|\d+[.)][ \t]*)?)$")
# words that are capitalized mid-sentence in headings and tables rather than being names
_NOT_NAMES = {"The", "A", "An", "This", "That", "These", "Those", "It", "Its", "He", "She", "We", "They",
              "You", "In", "On", "At", "For", "And", "But", "Or", "If", "When", "While", "As", "Of", "To"}


def key_names(text: str, limit: int = DEFAULT_KEY_NAMES, min_count: int = 2) -> list[str]:
    """The document's most frequent proper names, most frequent first (ties: first seen).

    A name is a phrase of capitalized words inside a sentence. A capitalized phrase that
    starts a sentence counts only if the same phrase also occurs inside one, otherwise
    without its first word ("The Aldmoor ferry" -> "Aldmoor", while a sentence starting
    with "Captain Odile Brask" counts for that name once it is seen mid-sentence).
    Possessive 's is dropped; leading words like "The" are dropped. Names seen fewer than
    ``min_count`` times are left out. A heuristic for English-like text: no model call.
    """
    inner: list[str] = []
    initial: list[str] = []
    for m in _NAME.finditer(text):
        start = m.start()
        at_start = start == 0 or _SENTENCE_START.search(text[max(0, start - 12):start]) is not None
        (initial if at_start else inner).append(m.group())

    def clean(phrase: str) -> str:
        words = re.sub(r"['\u2019]s$", "", phrase).split()
        while words and words[0] in _NOT_NAMES:
            words = words[1:]
        return " ".join(words)

    known = {clean(p) for p in inner}
    names = [clean(p) for p in inner]
    for p in initial:
        c = clean(p)
        if c in known:
            names.append(c)
        elif len(p.split()) > 1:
            names.append(clean(p.split(None, 1)[1]))
    counts = Counter(n for n in names if n)
    return [n for n, k in counts.most_common() if k >= min_count][:max(0, limit)]


def join_names(names: list[str]) -> str:
    """["A", "B", "C"] -> "A, B and C"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def instruction_for(text: str, plain: str, with_names: str, names: list[str], all_names: bool = False) -> str:
    """``with_names`` filled with the key names ``text`` contains (or all of them), else ``plain``."""
    present = list(names) if all_names else [n for n in names if n in text]
    return with_names.format(names=join_names(present)) if present else plain


def distinct_sentences(parts: list[str], overlap: float = 0.6) -> list[str]:
    """``parts`` without repeated sentences: a sentence whose word set overlaps an earlier
    one's by ``overlap`` or more (Jaccard) is dropped. Small models' summaries loop."""
    seen: list[set[str]] = []
    out = []
    for part in parts:
        keep = []
        for sent in re.split(r"(?<=[.!?])\s+|\n+", part):
            words = set(re.findall(r"\w+", sent.lower()))
            if not words or any(len(words & w) >= overlap * len(words | w) for w in seen):
                continue
            seen.append(words)
            keep.append(sent.strip())
        if keep:
            out.append(" ".join(keep))
    return out


@sgl.function
def summarize_text(s, text, instruction=SUMMARY_PROMPT, max_tokens=160, kv_params=None):
    s += sgl.user("Here is a document.\n\n" + text + "\n\n" + instruction if instruction else text)
    s += sgl.assistant(sgl.gen("summary", max_tokens=max_tokens, temperature=0))


@dataclass
class Summary:
    mode: str  # the path taken: single, map-reduce, refine
    summary: str
    document_tokens: int
    calls: int = 0
    levels: int = 0  # map-reduce rounds
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rids: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # map-reduce: the chunk summaries (first level)
    key_names: list[str] = field(default_factory=list)  # the names given to the model (see key_names)
    kv: dict = field(default_factory=dict)  # totals over the calls the server compressed


@lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class Summarizer:
    """Summaries through an SGLang frontend backend (a :class:`KVEndpoint`)."""

    def __init__(self, endpoint: KVEndpoint, *, context: int | None = None, chunk_tokens: int | None = None,
                 max_tokens: int = 160, num_threads: int = 8, key_names: int = DEFAULT_KEY_NAMES) -> None:
        self.ep = endpoint
        info = endpoint.model_info
        self.tok = _tokenizer(info["model_path"])
        self.context = int(context or 0) or self._model_context(info)
        self.max_tokens = max_tokens
        if self.context <= max_tokens + PROMPT_OVERHEAD + 64:
            raise ValueError(f"context {self.context} leaves no room for a document "
                             f"(max_tokens {max_tokens} + {PROMPT_OVERHEAD} of prompt)")
        self.budget = self.context - max_tokens - PROMPT_OVERHEAD  # document tokens one call may take
        self.chunk_tokens = min(chunk_tokens or DEFAULT_CHUNK_TOKENS, self.budget)
        self.num_threads = num_threads
        self.key_names = max(0, int(key_names))

    @staticmethod
    def _model_context(info: dict) -> int:
        cfg = json.loads((Path(info["model_path"]) / "config.json").read_text())
        return int(cfg["max_position_embeddings"])

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def chunks(self, text: str, size: int | None = None) -> list[str]:
        """Split at paragraph (then sentence, then token) boundaries into pieces of <= size tokens."""
        size = size or self.chunk_tokens
        pieces: list[str] = []
        for para in [p for p in text.split("\n\n") if p.strip()]:
            if self.count(para) <= size:
                pieces.append(para)
                continue
            for sent in para.replace(". ", ".\n").split("\n"):
                ids = self.tok(sent, add_special_tokens=False).input_ids
                for i in range(0, len(ids), size):
                    pieces.append(self.tok.decode(ids[i:i + size]))
        out, cur, cur_n = [], [], 0
        for piece in pieces:
            n = self.count(piece)
            if cur and cur_n + n + 1 > size:
                out.append("\n\n".join(cur))
                cur, cur_n = [], 0
            cur.append(piece)
            cur_n += n + 1
        if cur:
            out.append("\n\n".join(cur))
        return out

    # -- calls ---------------------------------------------------------------------
    def _run(self, result: Summary, texts: list[str], plain: str, with_names: str | None = None, *,
             all_names: bool = False) -> list[str]:
        """One call per text: ``with_names`` naming the key names that text contains (or, with
        ``all_names``, all of them: partial summaries may have lost some), else ``plain``."""
        args = [{"text": t, "max_tokens": self.max_tokens,
                 "instruction": instruction_for(t, plain, with_names, result.key_names, all_names)
                 if with_names else plain} for t in texts]
        states = summarize_text.run_batch(args, backend=self.ep, num_threads=self.num_threads)
        out = []
        for st in states:
            if st.error():
                raise RuntimeError(f"summarize call failed: {st.error()}")
            meta = st.get_meta_info("summary")
            result.calls += 1
            result.prompt_tokens += meta.get("prompt_tokens", 0)
            result.completion_tokens += meta.get("completion_tokens", 0)
            result.rids.append(meta["id"])
            out.append(st["summary"].strip())
        return out

    def _collect_kv(self, result: Summary) -> None:
        report = [r for r in self.ep.kv_report(result.rids).values() if r]
        result.kv = {
            "compressed_calls": len(report),
            "held_bytes": sum(r["held_bytes"] for r in report),
            "full_bytes": sum(r["full_bytes"] for r in report),
        }

    def summarize(self, text: str, mode: str = "auto") -> Summary:
        if not text.strip():
            raise ValueError("the document is empty")
        n = self.count(text)
        if mode == "auto":
            mode = "single" if n <= self.budget else "map-reduce"
        if mode == "single" and n > self.budget:
            raise ValueError(f"document has {n} tokens; a single pass takes at most {self.budget} "
                             f"(context {self.context}); use --mode map-reduce or refine")
        result = Summary(mode=mode, summary="", document_tokens=n)
        result.key_names = key_names(text, self.key_names) if self.key_names else []
        if mode == "single":
            result.summary = self._run(result, [text], SUMMARY_PROMPT, SUMMARY_PROMPT_NAMES)[0]
        elif mode == "map-reduce":
            result.summary = self._map_reduce(result, text)
        elif mode == "refine":
            result.summary = self._refine(result, text)
        else:
            raise ValueError(f"unknown mode {mode!r}; expected auto, single, map-reduce or refine")
        self._collect_kv(result)
        return result

    def _map_reduce(self, result: Summary, text: str) -> str:
        parts = self._run(result, self.chunks(text), PART_PROMPT, PART_PROMPT_NAMES)
        result.parts = list(parts)
        result.levels = 1
        while True:
            joined = "\n\n".join(distinct_sentences(parts) or parts)
            if self.count(joined) <= self.budget:
                return self._run(result, [joined], COMBINE_PROMPT, COMBINE_PROMPT_NAMES, all_names=True)[0]
            # still too long: summarize groups of partial summaries, then try again
            groups = self.chunks(joined)
            if len(groups) >= len(parts):
                raise RuntimeError("partial summaries do not shrink; lower --max-tokens")
            parts = self._run(result, groups, COMBINE_PROMPT, COMBINE_PROMPT_NAMES)
            result.levels += 1

    def _refine(self, result: Summary, text: str) -> str:
        reserve = self.max_tokens + 64  # the running summary shares the prompt with the chunk
        summary = ""
        for chunk in self.chunks(text, max(64, self.chunk_tokens - reserve)):
            if not summary:
                summary = self._run(result, [chunk], SUMMARY_PROMPT, SUMMARY_PROMPT_NAMES)[0]
            else:
                prompt = REFINE_PROMPT.format(summary=summary, chunk=chunk)
                if result.key_names:  # all of them: the running summary may have lost some
                    prompt += REFINE_NAMES.format(names=join_names(result.key_names))
                summary = self._run(result, [prompt], "")[0]
        result.levels = 1
        return summary


def main(argv: list[str] | None = None) -> int:
    from headkv_sglang.programs.long_doc_qa import add_server_args, doc_and_endpoint

    p = argparse.ArgumentParser(prog="python -m headkv_sglang.programs.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="auto", choices=["auto", "single", "map-reduce", "refine"])
    p.add_argument("--max-tokens", type=int, default=160, help="tokens per summary call")
    p.add_argument("--context", type=int, default=None,
                   help="tokens one call may hold (default: the model's max_position_embeddings)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="map-reduce/refine chunk size in tokens (default 2048: under a fixed per-head KV "
                        "budget a smaller chunk keeps a larger share of its KV)")
    p.add_argument("--key-names", type=int, default=DEFAULT_KEY_NAMES, metavar="N",
                   help="give the model the document's N most frequent proper names (capitalized phrases "
                        "inside sentences, seen at least twice) and ask it to mention them; 0: off "
                        "(default %(default)s)")
    p.add_argument("--json", action="store_true")
    add_server_args(p)
    a = p.parse_args(argv)
    if a.key_names < 0:
        p.error(f"--key-names must be >= 0, got {a.key_names}")
    text, ep = doc_and_endpoint(p, a)
    s = Summarizer(ep, context=a.context, chunk_tokens=a.chunk_tokens, max_tokens=a.max_tokens,
                   key_names=a.key_names).summarize(text, a.mode)
    if a.json:
        print(json.dumps(asdict(s), indent=2))
        return 0
    print(s.summary)
    kv = s.kv
    saved = (f"KV held {fmt_bytes(kv['held_bytes'])} instead of {fmt_bytes(kv['full_bytes'])} "
             f"in {kv['compressed_calls']} compressed call(s)") if kv.get("compressed_calls") else "KV uncompressed"
    print(f"\n[{s.mode}: {s.document_tokens} document tokens, {s.calls} call(s), {s.levels or 1} level(s), "
          f"{s.prompt_tokens} prompt + {s.completion_tokens} completion tokens; {saved}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
