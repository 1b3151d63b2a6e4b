"""Long outputs: KV held per request while it generates, and summaries, with and without a
decode budget (``kv_decode_budget``, decode-phase compression; ``policies/decode.py``).

    python benchmarks/long_outputs.py --out benchmarks/results/long_outputs_cpu
    python benchmarks/long_outputs.py --server http://127.0.0.1:30000 --model-path DIR   # an existing server

1. **Memory over a long generation.** One ~1.2k-token document (``--prompt document``), or
   a short question asking for a long step-by-step answer (``--prompt question``: the
   reasoning case, a prompt too short to compress on its own), ``--tokens`` generated tokens
   (``ignore_eos``), one request at a time on an otherwise idle server, for each
   configuration (full KV; snapkv at ``--budget`` on the prompt only; the same plus each
   ``--decode-budgets``). Every ``--every`` streamed tokens the server is asked what it holds:
   token-pool slots outside the radix tree's evictable cache (the request's tail; with full
   KV also its locked prompt) plus the compressed pool's used pages, in bytes.
2. **Summaries.** ``--docs`` prose documents, each summarized in ``--summary-tokens`` tokens
   (``ignore_eos``: every output is that long), scored by ROUGE-L F1 against the full-KV
   summary; the prompt-only configuration shows what the prompt's compression alone costs,
   so the decode budgets' own cost is the difference. ``--docs 0`` skips them.

Writes ``OUT.json`` (every sample and output), ``OUT.md`` and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.niah import machine  # noqa: E402
from benchmarks.tasks import build, rouge_l  # noqa: E402
from headkv_sglang.config import ModelShape  # noqa: E402
from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.haystack import needle_prompt  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402

#: ``--prompt question``: a short prompt whose answer is long (the reasoning case)
QUESTION = "A train travels 312 km at 78 km/h, then 140 km at 56 km/h. Explain step by step how long the trip takes."

SERVER_ARGS = ["--kv-policy", "full", "--max-total-tokens", "30000", "--enable-cache-report", "--sleep-on-idle"]


def server_state(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(f"{url}/server_info", timeout=timeout) as r:
        return json.loads(r.read())["internal_states"][0]["headkv_sglang"]


def held_bytes(st: dict, token_bytes: int) -> dict:
    tp, pool = st["token_pool"], st["pool"]
    slots = tp["total"] - tp["available"] - tp["evictable"] - tp.get("lent_to_pages", 0)  # pages' own below
    return {"token_slots": slots, "pages": pool["used_pages"],
            "bytes": slots * token_bytes + pool["used_pages"] * pool["bytes_per_page"]}


def stream(url: str, prompt: str, params: dict, max_tokens: int, every: int = 0, token_bytes: int = 0) -> dict:
    """One greedy streamed chat request; with ``every``, samples the KV held every ``every`` chunks."""
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "custom_params": params}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    text, samples, n, t0 = [], [], 0, time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
                n += 1
                if every and n % every == 0:
                    samples.append({"generated": n, **held_bytes(server_state(url), token_bytes)})
    return {"text": "".join(text), "chunks": n, "samples": samples, "seconds": round(time.perf_counter() - t0, 1)}


def configs(budget: int, decode_budgets: list[int]) -> list[tuple[str, dict]]:
    out = [("full", {"kv_policy": "full"}), (f"snapkv-{budget}", {"kv_policy": "snapkv", "kv_budget": budget})]
    out += [(f"snapkv-{budget} + decode {d}", {"kv_policy": "snapkv", "kv_budget": budget, "kv_decode_budget": d})
            for d in decode_budgets]
    return out


def run(url: str, a, token_bytes: int) -> dict:
    from tqdm import tqdm

    cfgs = configs(a.budget, a.decode_budgets)
    doc = needle_prompt(800, depth=0.5, seed=7).prompt if a.prompt == "document" else QUESTION
    memory = {}
    for name, params in tqdm(cfgs, desc="memory", disable=a.no_progress):
        stream(url, doc, params, 1)  # the prompt in the radix tree: every configuration starts alike
        memory[name] = stream(url, doc, params, a.tokens, every=a.every, token_bytes=token_bytes)
        memory[name]["idle_after"] = held_bytes(server_state(url), token_bytes)
    docs = [build("summary", 1200, seed=100 + i).prompt for i in range(a.docs)]
    summaries: dict[str, list[str]] = {}
    for name, params in tqdm(cfgs if docs else [], desc="summaries", disable=a.no_progress):
        outs: list[str] = [""] * len(docs)

        def one(i: int, params=params, outs=outs) -> None:
            outs[i] = stream(url, docs[i], params, a.summary_tokens)["text"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(docs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summaries[name] = outs
    rouge = {name: sum(rouge_l(o, r) for o, r in zip(outs, summaries["full"])) / len(docs)
             for name, outs in summaries.items()}
    return {"memory": memory, "summaries": summaries, "rouge_l_vs_full": rouge,
            "decode": server_state(url).get("decode")}


def markdown(res: dict, meta: dict) -> str:
    first = next(iter(res["memory"].values()))["samples"]
    step = max(1, len(first) // 5)  # about five columns
    cols = [s["generated"] for s in first[::step]]
    lines = ["# Long outputs: KV held while generating, and summaries (decode budgets)", "",
             f"Machine: {meta['machine']}. Model: {meta['model']}. Command: `{meta['command']}`.", "",
             f"## KV held by one request over {meta['tokens']} generated tokens "
             f"({meta.get('prompt_desc', '~1.2k-token prompt')})", "",
             "| configuration | " + " | ".join(f"{c} tokens" for c in cols) + " | seconds |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, m in res["memory"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s['bytes'] / 2**20:.2f} MB" for s in m["samples"][::step])
                     + f" | {m['seconds']} |")
    lines += ["", "Bytes = token-pool slots outside the evictable radix cache (the tail; with full KV the locked "
              "prompt too) + the compressed pool's used pages. After each request every configuration is back "
              "to zero: " + ", ".join(f"{n}: {m['idle_after']['bytes']}" for n, m in res["memory"].items()) + "."]
    if res["rouge_l_vs_full"]:  # --docs 0: no summaries
        lines += ["", f"## Summaries of {meta['docs']} documents (~1.2k tokens), {meta['summary_tokens']} tokens "
                  "each: ROUGE-L F1 against the full-KV summary", "", "| configuration | ROUGE-L vs full |", "|---|---|"]
        lines += [f"| {name} | {r:.3f} |" for name, r in res["rouge_l_vs_full"].items()]
    lines += ["", f"Decode compression on the server during the run: `{json.dumps(res['decode'])}`", ""]
    return "\n".join(lines)


def plot(res: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["rouge_l_vs_full"])
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(12 if names else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for name, m in res["memory"].items():
        ax.plot([s["generated"] for s in m["samples"]], [s["bytes"] / 2**20 for s in m["samples"]], label=name)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV held by the request (MB)")
    ax.set_title("KV held while generating")
    ax.legend(fontsize=8)
    if names:
        bx = axes[0][1]
        bx.barh(names, [res["rouge_l_vs_full"][n] for n in names])
        bx.set_xlim(0, 1.05)
        bx.set_xlabel("ROUGE-L F1 vs the full-KV summary")
        bx.set_title("long summaries")
    fig.tight_layout()
    path = f"{out}.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=None, help="an existing --kv-policy server (default: start one)")
    p.add_argument("--model-path", default=None, help="the served model's directory (default: the test model)")
    p.add_argument("--tokens", type=int, default=2000, help="tokens generated in the memory run")
    p.add_argument("--every", type=int, default=50, help="sample the KV held every N tokens")
    p.add_argument("--budget", type=int, default=64, help="snapkv prompt budget (tokens per KV head)")
    p.add_argument("--decode-budgets", type=int, nargs="+", default=[64, 256])
    p.add_argument("--prompt", choices=["document", "question"], default="document",
                   help="the memory run's prompt: a ~1.2k-token document, or a short question (reasoning)")
    p.add_argument("--docs", type=int, default=6, help="documents summarized (0: no summaries)")
    p.add_argument("--summary-tokens", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/long_outputs_cpu")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag, v in (("--tokens", a.tokens), ("--every", a.every), ("--budget", a.budget),
                    ("--summary-tokens", a.summary_tokens), *(("--decode-budgets", d) for d in a.decode_budgets)):
        if v < 1:
            p.error(f"{flag}: invalid value {v}; expected a positive integer")
    if a.docs < 0:
        p.error(f"--docs: invalid value {a.docs}; expected an integer >= 0")
    if a.every > a.tokens:
        p.error(f"--every {a.every} exceeds --tokens {a.tokens}: nothing would be sampled")
    mdir = Path(a.model_path) if a.model_path else models.model_dir()
    shape = ModelShape.from_model_path(mdir)
    srv = None
    try:
        if a.server is None:
            srv = SGLangServer(mdir, SERVER_ARGS, log_path=f"{a.out}.server.log").start()
        url = a.server or srv.url
        tb = token_bytes(url, shape)
        res = run(url, a, tb)
    finally:
        if srv is not None:
            srv.stop()
    meta = {"machine": machine(), "model": mdir.name, "tokens": a.tokens, "docs": a.docs, "prompt": a.prompt,
            "prompt_desc": "~1.2k-token prompt" if a.prompt == "document" else
            f"a {prompt_tokens(mdir, QUESTION)}-token question asking for a step-by-step answer",
            "summary_tokens": a.summary_tokens, "token_bytes": tb,
            "command": "python benchmarks/long_outputs.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(a.out, meta, res, markdown, plot)
    return 0


def prompt_tokens(model_dir: Path, text: str) -> int:
    """Tokens of ``text`` as a chat prompt (one user turn) under the model's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return len(tok(chat, add_special_tokens=False)["input_ids"])


def token_bytes(url: str, shape: ModelShape) -> int:
    """Bytes of one token's full KV (every layer and KV head) on the server at ``url``."""
    st = server_state(url)
    elt = st["pool"]["bytes_per_page"] // (2 * st["pool"]["page_size"] * shape.head_dim)
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * elt


def write_results(out: str, meta: dict, res: dict, markdown, plot) -> None:
    """``OUT.json`` (meta + results), ``OUT.md`` (``markdown(res, meta)``, also printed) and
    the plot (``plot(res, out)``)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(res, meta))
    print(markdown(res, meta))
    print("plot:", plot(res, out))


if __name__ == "__main__":
    sys.exit(main())
