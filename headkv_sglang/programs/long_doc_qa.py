"""Long-document QA: one document, N questions, one shared prefill.

The document goes first, then ``fork(N)``: SGLang's frontend caches the shared prefix
once (a prefill-only request), every branch then gets it from the radix cache and only
prefills its own question. On a ``--kv-policy`` server each branch's prompt (document +
question) is compressed after its prefill, so N decodes hold N compressed caches instead
of N full ones.

When the branches are compressed, the document is compressed once by default (``kv_share``):
the program first sends the document alone (``max_tokens=0``), whose compressed prompt the
server publishes, and every branch extends it, so it reads that copy instead of compressing
its own; N decodes then hold one compressed document plus N short question tails. No
question ranks that copy: the server scores it by reconstruction (``kv_scoring`` "auto":
a pass that repeats the document after it ranks its tokens, KVzip; docs/serving-and-flags.md).
Per-branch copies would hold more than the radix tree's one full copy as soon as a few
questions are asked (``benchmarks/results/shared_document_8k_cpu.md``). ``--no-kv-share``
compresses each branch with its own question instead; with ``--kv-policy full`` (or a
server without compression) nothing is compressed and the radix tree shares the document.

    python -m headkv_sglang.programs.long_doc_qa --doc headkv_sglang/programs/examples/orbital_report.txt \\
        --question "Who founded Halvorsen Orbital?" --question "..." \\
        --kv-policy headkv --kv-budget 128 [--server http://127.0.0.1:30000]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import sglang as sgl

from headkv_sglang.config import SCORING_CHOICES
from headkv_sglang.programs.endpoint import DEFAULT_URL, KVEndpoint, budget_arg, fmt_bytes

INSTRUCTION = "Answer the question using only the document above. Reply with the answer only."


@sgl.function
def long_doc_qa(s, document, questions, max_tokens=32, kv_params=None, share=False):
    s += sgl.user_begin()
    # the fork point ends on "." (not whitespace), so the prefix's tokens are the first
    # tokens of every branch's prompt: a shared compressed prompt must be a token prefix
    s += "Read this document.\n\n" + document + "\n\n" + INSTRUCTION
    if share:  # the document alone, compressed and published (kv_share) before the branches
        s += sgl.gen("document", max_tokens=0)
    forks = s.fork(len(questions))
    for f, q in zip(forks, questions):
        f += f"\nQuestion: {q}"
        f += sgl.user_end()
        f += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))
    forks.join()
    s.set_var("answers", [f["answer"].strip() for f in forks])
    s.set_var("metas", [f.get_meta_info("answer") for f in forks])


@dataclass
class Answer:
    question: str
    answer: str
    rid: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    kv: dict | None  # what the server's compression kept for this branch (None: uncompressed)


def ask(endpoint: KVEndpoint, document: str, questions: list[str], max_tokens: int = 32,
        share: bool = False) -> list[Answer]:
    """Answer ``questions`` about ``document``; ``share``: one compressed document for all."""
    if not questions:
        raise ValueError("give at least one question")
    state = long_doc_qa.run(document=document, questions=questions, max_tokens=max_tokens, share=share,
                            kv_params={"kv_share": True} if share else None, backend=endpoint)
    if state.error():
        raise RuntimeError(f"long_doc_qa failed: {state.error()}")
    answers, metas = state.get_var("answers"), state.get_var("metas")
    report = endpoint.kv_report([m["id"] for m in metas])
    return [
        Answer(q, a, m["id"], m.get("prompt_tokens", 0), m.get("cached_tokens", 0),
               m.get("completion_tokens", 0), report.get(m["id"]))
        for q, a, m in zip(questions, answers, metas)
    ]


def compresses(endpoint: KVEndpoint, kv_policy: str | None) -> bool:
    """Whether the branches' prompts will be compressed: the policy asked for (or the server's
    ``--kv-policy``) compresses and the budget keeps less than the whole prompt."""
    from headkv_sglang.policies.registry import POLICIES

    cfg = endpoint.server_state().get("config") or {}
    policy = kv_policy or cfg.get("policy")
    asked = endpoint.kv_params.get("kv_budget")
    whole = str(asked).strip() == "100%" if asked is not None else cfg.get("budget_ratio") == 1.0
    cls = POLICIES.get(policy) if policy else None
    return bool(cls is not None and cls.compresses and not whole)


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--doc", required=True, type=Path, help="the document (a text file)")
    p.add_argument("--server", default=DEFAULT_URL, help="SGLang server URL (default %(default)s)")
    p.add_argument("--kv-policy", default=None,
                   help="per-request policy (full, headkv, snapkv, ...); default: the server's --kv-policy")
    p.add_argument("--kv-budget", type=budget_arg, default=None,
                   help="per-request budget: tokens per KV head (128) or a share of each prompt (5%%)")
    p.add_argument("--kv-scoring", choices=list(SCORING_CHOICES), default=None,
                   help="what ranks the document's tokens (default: the server's; 'auto' scores a shared "
                        "document by reconstruction and a branch's own copy by its question)")


def doc_and_endpoint(p: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[str, KVEndpoint]:
    """The ``--doc`` text (a parser error if unreadable) and the endpoint for the server flags."""
    try:
        text = a.doc.read_text()
    except OSError as e:
        p.error(f"--doc: cannot read {a.doc}: {e.strerror}")
    return text, KVEndpoint(a.server, kv_policy=a.kv_policy, kv_budget=a.kv_budget,
                            kv_scoring=getattr(a, "kv_scoring", None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.programs.long_doc_qa", description=__doc__.split("\n\n")[0])
    p.add_argument("--question", action="append", default=[], help="a question (repeat for several)")
    p.add_argument("--questions-file", type=Path, help="one question per line")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.add_argument("--kv-share", action=argparse.BooleanOptionalAction, default=None,
                   help="compress the document once and let every question read that copy (the default "
                        "when the branches are compressed); --no-kv-share: each branch compresses its own")
    add_server_args(p)
    a = p.parse_args(argv)
    questions = list(a.question)
    if a.questions_file:
        questions += [q.strip() for q in a.questions_file.read_text().splitlines() if q.strip()]
    if not questions:
        p.error("give --question (repeatable) or --questions-file")
    document, ep = doc_and_endpoint(p, a)
    share = a.kv_share if a.kv_share is not None else compresses(ep, a.kv_policy)
    answers = ask(ep, document, questions, a.max_tokens, share=share)
    if a.json:
        print(json.dumps([asdict(x) for x in answers], indent=2))
        return 0
    reads = [x.kv for x in answers if x.kv and x.kv.get("shared") == "read"]
    if share and reads:
        print(f"The document: one shared compressed copy ({reads[0]['shared_tokens']} tokens, "
              f"{fmt_bytes(reads[0]['shared_bytes'])}) read by {len(reads)} of {len(answers)} questions")
    elif any(x.kv for x in answers):
        print("The document: each question compressed its own copy (--no-kv-share)")
    else:
        print("The document: full KV, shared by the questions through the radix cache (not compressed)")
    for i, x in enumerate(answers, 1):
        print(f"Q{i}: {x.question}\nA{i}: {x.answer}")
        if not x.kv:
            kv = "uncompressed"
        elif x.kv.get("shared") == "read":
            kv = (f"{x.kv['policy']} budget {x.kv['budget']}: reads the shared compressed document "
                  f"({x.kv['shared_tokens']} tokens, {fmt_bytes(x.kv['shared_bytes'])}, one copy for all questions)")
        else:
            kv = (f"{x.kv['policy']} budget {x.kv['budget']}: holds {fmt_bytes(x.kv['held_bytes'])} "
                  f"of {fmt_bytes(x.kv['full_bytes'])} ({x.kv['ratio']}x less)")
        print(f"    prompt {x.prompt_tokens} tokens ({x.cached_tokens} from the radix cache), KV: {kv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
