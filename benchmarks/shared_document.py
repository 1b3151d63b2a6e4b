"""Many questions over one document: one shared compressed copy (``kv_share``) against a
compressed copy per request, and against full KV.

    python benchmarks/shared_document.py --out benchmarks/results/shared_document_cpu
    python benchmarks/shared_document.py --server http://127.0.0.1:30000 --model-path DIR   # an existing server

One document of ~``--doc-tokens`` tokens holds ``--questions`` same-shaped facts ("The special
magic number for <key> is: <n>.", spread evenly through it); each question asks for one of
them, in a chat turn that starts with the document (the document's tokens are a prefix of
every prompt). For each configuration the server's caches are flushed, then:

* ``full``: the questions, all at once (SGLang's radix tree shares the document's full KV);
* ``<policy> per request``: the same, each request compressing its own copy of its prompt
  (question-aware scoring for the query-scored policies);
* ``<policy> shared``: the document alone first (``max_new_tokens: 0``, ``kv_share``),
  then the questions with ``kv_share``: they read its compressed copy; their own tokens
  stay whole.

Measured per configuration: answers right (the number in the output), prompt tokens the
server computed (prompt tokens minus cached ones, summed over requests), compressions run,
and the KV the server held (sampled every 0.2 s: token-pool slots outside the radix tree's
evictable cache plus the compressed pool's used pages): the most once every question
decodes, and the peak with the prefills.
Writes ``OUT.json`` (every answer), ``OUT.md`` and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.long_outputs import held_bytes, server_state, token_bytes, write_results  # noqa: E402
from benchmarks.niah import machine  # noqa: E402
from headkv_sglang.config import ModelShape  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.haystack import haystack  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

# a long prefill forward on a 2-core CPU can outlast SGLang's 300 s scheduler watchdog
SERVER_ARGS = ["--kv-policy", "full", "--max-total-tokens", "60000", "--enable-cache-report", "--sleep-on-idle",
               "--watchdog-timeout", "1800"]
KEYS_A = ["amber", "brisk", "cobalt", "dusty", "ember", "frosty", "golden", "hollow", "ivory", "jade",
          "lunar", "misty", "noble", "olive", "pale", "quiet", "rusty", "silver", "tawny", "velvet"]
KEYS_B = ["falcon", "harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "river", "saddle",
          "thistle", "valley", "willow", "anchor", "beacon", "canyon", "dagger", "fjord", "garnet"]


def document(tok, n_tokens: int, n_facts: int, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """A haystack of about ``n_tokens`` tokens with ``n_facts`` (key, number) facts spread through it."""
    rng = random.Random(seed)
    keys = rng.sample([f"{a}-{b}" for a in KEYS_A for b in KEYS_B], n_facts)
    facts = [(k, str(rng.randrange(10_000, 99_999))) for k in keys]
    words = int(n_tokens * 0.72)
    for _ in range(6):
        sents = haystack(words, seed)
        for i, (k, n) in reversed(list(enumerate(facts))):
            sents.insert(round((i + 0.5) / n_facts * len(sents)), f"The special magic number for {k} is: {n}.")
        text = " ".join(sents)
        got = len(tok(text, add_special_tokens=False)["input_ids"])
        if abs(got - n_tokens) <= 0.02 * n_tokens:
            break
        words = max(50, round(words * n_tokens / got))
    return text, facts


def prompts(tok, text: str, facts: list[tuple[str, str]]) -> tuple[list[int], list[list[int]]]:
    """The document's chat-prefix tokens, and each question's whole prompt (that prefix + its turn's end)."""
    return chat_prompts(tok, text, [f"What is the special magic number for {k} mentioned in the text? Answer with "
                                    "the number only." for k, _ in facts])


def chat_prompts(tok, text: str, questions: list[str]) -> tuple[list[int], list[list[int]]]:
    """The chat-prefix tokens of a user turn starting with ``text``, and for each question the
    whole prompt: that prefix + the question + the template's tail (the turn is ``text``,
    a blank line, the question)."""
    chat = tok.apply_chat_template([{"role": "user", "content": text + "\n\nQQQ"}], tokenize=False,
                                   add_generation_prompt=True)
    head, tail = chat.split("QQQ")
    doc = tok(head, add_special_tokens=False)["input_ids"]
    return doc, [doc + tok(q + tail, add_special_tokens=False)["input_ids"] for q in questions]


class RequestError(RuntimeError):
    """The server refused a streamed request inside its stream (``data: {"error": ...}``: the
    HTTP status is 200 by then); ``code`` is the status it names (400: bad parameters)."""

    def __init__(self, code: int | None, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code, self.message = code, message


def generate(url: str, ids: list[int], max_tokens: int, params: dict, first: threading.Event | None = None) -> dict:
    """One greedy ``/generate`` request, streamed; ``first`` is set when its first token arrives
    (its prefill is done). Returns the last chunk (text and meta_info); an error chunk raises
    :class:`RequestError`."""
    body = {"input_ids": ids, "stream": True, "sampling_params": {
        "max_new_tokens": max_tokens, "temperature": 0, "custom_params": params}}
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    last = None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
                if "error" in last:
                    err = last["error"] if isinstance(last["error"], dict) else {"message": str(last["error"])}
                    raise RequestError(err.get("code"), str(err.get("message")))
                if first is not None:
                    first.set()
    if last is None:
        raise RuntimeError(f"no answer streamed for a {len(ids)}-token prompt")
    return last


def flush(url: str) -> None:
    for _ in range(120):
        try:  # SGLang answers 400 while requests are in flight (its warm-up one at start, say)
            with urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST"), timeout=60) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
        time.sleep(1)
    raise RuntimeError("the server did not flush its cache")


def configs(policies: list[str], budget: str) -> list[tuple[str, dict, bool]]:
    out = [("full", {"kv_policy": "full"}, False)]
    for p in policies:
        base = {"kv_policy": p, "kv_budget": budget}
        out.append((f"{p} per request", {**base, "kv_scoring": "question"}, False))
        out.append((f"{p} shared", {**base, "kv_share": True}, True))
    return out


def run_config(url: str, doc: list[int], qs: list[list[int]], params: dict, shared: bool, max_tokens: int,
               token_bytes: int) -> dict:
    flush(url)
    before = server_state(url)
    t0 = time.perf_counter()
    computed = 0
    doc_out, doc_seconds = None, None
    if shared:
        doc_out = out = generate(url, doc, 0, params)
        doc_seconds = round(time.perf_counter() - t0, 2)  # its prefill + compression, alone on the server
        computed += out["meta_info"]["prompt_tokens"] - out["meta_info"].get("cached_tokens", 0)
    outs: list[dict | None] = [None] * len(qs)
    firsts = [threading.Event() for _ in qs]
    peak: dict = {"bytes": 0}
    errors: list[str] = []
    decoding: dict = {"bytes": 0, "samples": 0}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, decoding
        while not done.is_set():
            all_decoding = all(f.is_set() for f in firsts)
            try:  # /server_info waits for the scheduler: a long prefill chunk can take minutes
                h = held_bytes(server_state(url, timeout=900), token_bytes)
            except OSError as e:
                errors.append(repr(e))
                continue
            peak = max(peak, h, key=lambda x: x["bytes"])
            if all_decoding and not done.is_set():  # every prefill done, some still decoding
                decoding = {**max(decoding, h, key=lambda x: x["bytes"]), "samples": decoding["samples"] + 1}
            time.sleep(0.2)

    def one(i: int) -> None:
        outs[i] = generate(url, qs[i], max_tokens, params, firsts[i])

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(qs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    after = server_state(url)
    computed += sum(o["meta_info"]["prompt_tokens"] - o["meta_info"].get("cached_tokens", 0) for o in outs)
    total = lambda st: sum(p["compressed_requests_total"] for p in st["policies"].values())  # noqa: E731
    reports = [after["recent_requests"].get(o["meta_info"]["id"], {}) for o in outs]
    ran = [after["recent_requests"].get(doc_out["meta_info"]["id"], {})] if doc_out is not None else []
    ran += [r for r in reports if r.get("shared") != "read"]  # a read compresses nothing
    return {"texts": [o["text"] for o in outs], "seconds": round(seconds, 1), "prompt_tokens_computed": computed,
            "compressions": total(after) - total(before), "peak_held": peak, "decode_held": decoding,
            "reads_shared": sum(r.get("shared") == "read" for r in reports), "sample_errors": errors,
            # the server reports no compress_ms for a document request that ends with its prefill
            "compress_ms": [r["compress_ms"] for r in ran if "compress_ms" in r], "doc_seconds": doc_seconds,
            "integrity": after.get("integrity")}


def run(url: str, a, tok, token_bytes: int) -> dict:
    from tqdm import tqdm

    text, facts = document(tok, a.doc_tokens, a.questions, a.seed)
    doc, qs = prompts(tok, text, facts)
    res = {"doc_tokens": len(doc), "question_tokens": [len(q) - len(doc) for q in qs], "facts": facts,
           "configs": {}}
    for name, params, shared in tqdm(configs(a.policies, a.budget), desc="configurations", disable=a.no_progress):
        r = run_config(url, doc, qs, params, shared, a.max_tokens, token_bytes)
        r["params"] = params
        r["correct"] = sum(n in t for (_, n), t in zip(facts, r["texts"]))
        res["configs"][name] = r
    flush(url)
    return res


def markdown(res: dict, meta: dict) -> str:
    full = res["configs"]["full"]
    lines = [
        f"# {len(res['facts'])} questions over one {res['doc_tokens']}-token document: shared vs per-request "
        "compression",
        "",
        f"Machine: {meta['machine']}. Model: {meta['model']}. Command: `{meta['command']}`.",
        "",
        "All questions sent at once after a cache flush; answers greedy, "
        f"{meta['max_tokens']} tokens at most. *Prompt tokens computed*: prompt tokens minus cached ones, "
        "summed over the requests (the shared configuration's document request included). *Peak KV held*: "
        "the most the server held while the questions ran (token-pool slots outside the radix tree's "
        "evictable cache + compressed pages, prefills included); *KV held decoding*: the most it held "
        "once every question's prefill was done (its first token streamed). Times are wall-clock on a "
        "shared 2-core machine, for comparison within this run only.",
        "",
        "| configuration | right answers | vs full | prompt tokens computed | compressions | reads of a shared copy "
        "| KV held decoding | vs full | peak KV held | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["configs"].items():
        dec = r["decode_held"]["bytes"]
        lines.append(
            f"| {name} | {r['correct']}/{len(r['texts'])} | {r['correct'] / max(full['correct'], 1):.0%} "
            f"| {r['prompt_tokens_computed']} | {r['compressions']} | {r['reads_shared']} | {dec / 2**20:.1f} MB "
            f"| {dec / max(full['decode_held']['bytes'], 1):.1%} | {r['peak_held']['bytes'] / 2**20:.1f} MB "
            f"| {r['seconds']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["configs"])
    mb = [res["configs"][n]["decode_held"]["bytes"] / 2**20 for n in names]
    acc = [res["configs"][n]["correct"] / len(res["configs"][n]["texts"]) for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.6 * len(names) + 1.6))
    colors = ["#888" if n == "full" else "#d62728" if "per request" in n else "#2ca02c" for n in names]
    ax1.barh(names, mb, color=colors)
    ax1.set_xlabel("KV held while the questions decode (MB)")
    ax1.invert_yaxis()
    ax2.barh(names, acc, color=colors)
    ax2.set_xlabel("right answers (share)")
    ax2.set_xlim(0, 1)
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"{len(res['facts'])} questions over one {res['doc_tokens']}-token document")
    fig.tight_layout()
    path = f"{out}.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=None, help="an existing --kv-policy server (default: start one)")
    p.add_argument("--model-path", default=None, help="the served model's directory (default: the test model)")
    p.add_argument("--doc-tokens", type=int, default=4000,
                   help="document length (the test model reads 8k; on a 2-core CPU a 7.6k-token prefill takes "
                        "over 5 minutes per configuration)")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--policies", nargs="+", default=["snapkv", "streamingllm"])
    p.add_argument("--budget", default="10%", help="kv_budget of the compressed configurations")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/shared_document_cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag, v in (("--doc-tokens", a.doc_tokens), ("--questions", a.questions), ("--max-tokens", a.max_tokens)):
        if v < 1:
            p.error(f"{flag}: invalid value {v}; expected a positive integer")
    if a.questions > len(KEYS_A) * len(KEYS_B):
        p.error(f"--questions: at most {len(KEYS_A) * len(KEYS_B)}")
    from transformers import AutoTokenizer

    mdir = Path(a.model_path) if a.model_path else models.model_dir()
    shape = ModelShape.from_model_path(mdir)
    tok = AutoTokenizer.from_pretrained(mdir)
    srv = None
    try:
        if a.server is None:
            srv = SGLangServer(mdir, SERVER_ARGS, log_path=f"{a.out}.server.log").start()
        url = a.server or srv.url
        tb = token_bytes(url, shape)
        res = run(url, a, tok, tb)
    finally:
        if srv is not None:
            srv.stop()
    meta = {"machine": machine(), "model": mdir.name, "max_tokens": a.max_tokens, "token_bytes": tb,
            "command": "python benchmarks/shared_document.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(a.out, meta, res, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
