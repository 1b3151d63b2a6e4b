"""Summarize a document on the compressed cache: single pass, map-reduce, or refine.

* ``single`` — the whole document in one prompt (what ``--kv-policy`` compresses);
  chosen by ``auto`` when the document fits the model's context.
* ``map-reduce`` — token-aware chunks summarized in parallel (``run_batch``), then the
  partial summaries combined; recursive while the combined text still does not fit.
  ``auto`` takes it when the document does not fit.
* ``refine`` — chunk by chunk, each step rewriting the running summary with the next chunk.

    python -m programs.summarize --doc programs/examples/harbor_chronicle.txt \\
        [--mode auto|single|map-reduce|refine] [--kv-policy headkv --kv-budget 128] [--server URL]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import sglang as sgl

from programs.endpoint import KVEndpoint, fmt_bytes

# Measured with the test model: asking for the title keeps the summary on the document's
# subject under compression ("Summarize the text above" drifted off-topic at 5% of the KV).
SUMMARY_PROMPT = "Write a short summary of this document. Start with its title."
PART_PROMPT = "Write a short summary of this part of a document. Name the people and places in it."
COMBINE_PROMPT = ("These are summaries of consecutive parts of one document. Write one short summary of the "
                  "whole document. Name the people and places in it.")
DEFAULT_CHUNK_TOKENS = 2048
REFINE_PROMPT = ("Here is a summary of the first part of a document:\n{summary}\n\nHere is the next part:\n{chunk}\n\n"
                 "Rewrite the summary so that it covers both parts, in a few sentences. "
                 "Name the main people, places and organisations.")
# Room for the chat template and the instruction around a chunk, in tokens.
PROMPT_OVERHEAD = 96


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
    kv: dict = field(default_factory=dict)  # totals over the calls the server compressed


@lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class Summarizer:
    """Summaries through an SGLang frontend backend (a :class:`KVEndpoint`)."""

    def __init__(self, endpoint: KVEndpoint, *, context: int | None = None, chunk_tokens: int | None = None,
                 max_tokens: int = 160, num_threads: int = 8) -> None:
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
    def _run(self, result: Summary, texts: list[str], instruction: str) -> list[str]:
        args = [{"text": t, "instruction": instruction, "max_tokens": self.max_tokens} for t in texts]
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
        if mode == "single":
            result.summary = self._run(result, [text], SUMMARY_PROMPT)[0]
        elif mode == "map-reduce":
            result.summary = self._map_reduce(result, text)
        elif mode == "refine":
            result.summary = self._refine(result, text)
        else:
            raise ValueError(f"unknown mode {mode!r}; expected auto, single, map-reduce or refine")
        self._collect_kv(result)
        return result

    def _map_reduce(self, result: Summary, text: str) -> str:
        parts = self._run(result, self.chunks(text), PART_PROMPT)
        result.parts = list(parts)
        result.levels = 1
        while True:
            joined = "\n\n".join(parts)
            if self.count(joined) <= self.budget:
                return self._run(result, [joined], COMBINE_PROMPT)[0]
            # still too long: summarize groups of partial summaries, then try again
            groups = self.chunks(joined)
            if len(groups) >= len(parts):
                raise RuntimeError("partial summaries do not shrink; lower --max-tokens")
            parts = self._run(result, groups, COMBINE_PROMPT)
            result.levels += 1

    def _refine(self, result: Summary, text: str) -> str:
        reserve = self.max_tokens + 64  # the running summary shares the prompt with the chunk
        summary = ""
        for chunk in self.chunks(text, max(64, self.chunk_tokens - reserve)):
            if not summary:
                summary = self._run(result, [chunk], SUMMARY_PROMPT)[0]
            else:
                prompt = REFINE_PROMPT.format(summary=summary, chunk=chunk)
                summary = self._run(result, [prompt], "")[0]
        result.levels = 1
        return summary


def main(argv: list[str] | None = None) -> int:
    from programs.long_doc_qa import add_server_args, doc_and_endpoint

    p = argparse.ArgumentParser(prog="python -m programs.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="auto", choices=["auto", "single", "map-reduce", "refine"])
    p.add_argument("--max-tokens", type=int, default=160, help="tokens per summary call")
    p.add_argument("--context", type=int, default=None,
                   help="tokens one call may hold (default: the model's max_position_embeddings)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="map-reduce/refine chunk size in tokens (default 2048: under a fixed per-head KV "
                        "budget a smaller chunk keeps a larger share of its KV)")
    p.add_argument("--json", action="store_true")
    add_server_args(p)
    a = p.parse_args(argv)
    text, ep = doc_and_endpoint(p, a)
    s = Summarizer(ep, context=a.context, chunk_tokens=a.chunk_tokens, max_tokens=a.max_tokens).summarize(text, a.mode)
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
