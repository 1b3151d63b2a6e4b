"""NVIDIA kvpress on ``multi_question.py``'s cases, outside the server: the peer.

    ~/.cache/kvpress-venv/bin/python benchmarks/kvpress_peer.py --out benchmarks/results/multi_question_kvpress_cpu
    python benchmarks/multi_question.py --peer benchmarks/results/multi_question_kvpress_cpu.json ...

Runs in its own venv (kvpress pins its own transformers; ``pip install torch==2.13.0
kvpress==0.5.5``, see docs). The same documents as ``multi_question.py`` with the same
arguments (``--docs --facts --doc-tokens --seed``) and the same prompt tokens: the chat
prefix ending with the document is the press's context, each question + the template's tail
its question, as kvpress's ``kv-press-text-generation`` pipeline does with ``questions=[...]``:
the document prefilled and compressed once, without any question, then every question decoded
greedily from that one compressed cache.

Presses (``--presses``): ``full`` (no press), ``KVzipPress`` (ranks by reconstructing the
document), and the query-agnostic scorers ``ExpectedAttentionPress``, ``KeyDiffPress``
and ``AdaKV-ExpectedAttention`` (``AdaKVPress`` around it: per-head budgets by
masking) at their defaults (the settings kvpress's own benchmarks use), each at
``compression_ratio = 1 - budget``.

Measured per press and budget: right answers (``multi_question.correct``), the KV held: the
cache tensors' bytes after compression at the server's dtype (KVzip and AdaKV mask pruned keys
and free nothing) plus every question's own tokens (question + answer) as if they decoded at
once over the one copy (what the server's shared configuration holds), *kept* (the share of the
document's (layer, head, token) entries left unmasked), and compression time: prefill +
compression minus the same document's prefill without a press. Writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.multi_question import case, correct  # noqa: E402

PRESSES = ["full", "KVzipPress", "AdaKV-ExpectedAttention", "ExpectedAttentionPress", "KeyDiffPress"]


def make_press(name: str, ratio: float):
    import kvpress

    if name == "full":
        return None
    if name.startswith("AdaKV-"):
        return kvpress.AdaKVPress(press=getattr(kvpress, name[len("AdaKV-"):] + "Press")(compression_ratio=ratio))
    return getattr(kvpress, name)(compression_ratio=ratio)


def masked_entries(model) -> int:
    """(layer, head, token) entries the press masked (KVzip, AdaKV) instead of removing."""
    n = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            n += int(idx[0].numel())
    return n


def run_doc(pipe, press_name: str, ratio: float, ctx_ids, q_ids: list, max_tokens: int, elt: int) -> dict:
    import contextlib

    import torch
    from transformers import DynamicCache

    model = pipe.model
    press = make_press(press_name, ratio)
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
        model.model(input_ids=ctx_ids, past_key_values=cache)
    seconds = time.perf_counter() - t0
    layers, heads, n = len(cache.layers), cache.layers[0].keys.shape[1], ctx_ids.shape[1]
    stored = sum(layer.keys.shape[2] for layer in cache.layers) * heads  # (layer, head, token) entries stored
    masked = masked_entries(model) if press is not None else 0
    doc_bytes = 2 * stored * cache.layers[0].keys.shape[-1] * elt
    texts, own = [], 0
    for q in q_ids:
        lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
        with torch.no_grad():
            texts.append(pipe.generate_answer(question_ids=q, cache=cache, context_length=n,
                                              max_new_tokens=max_tokens))
        own += q.shape[1] + len(pipe.tokenizer(texts[-1], add_special_tokens=False)["input_ids"])
        pipe._remove_answer_from_cache(cache, lengths)
    token_bytes = 2 * layers * heads * cache.layers[0].keys.shape[-1] * elt
    return {"texts": texts, "prefill_s": seconds, "doc_bytes": doc_bytes, "held": doc_bytes + own * token_bytes,
            "kept": (stored - masked) / (layers * heads * n)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="the model's directory (default: the test model)")
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--facts", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", nargs="+", default=["10%"], help="share of the document's KV kept")
    p.add_argument("--presses", nargs="+", default=PRESSES)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-dtype-bytes", type=int, default=4,
                   help="bytes per KV element in the server (float32 on the CPU) for the held bytes")
    p.add_argument("--out", default="benchmarks/results/multi_question_kvpress_cpu")
    a = p.parse_args(argv)
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from benchmarks.shared_document import chat_prompts

    transformers.logging.disable_progress_bar()

    mdir = Path(a.model_path) if a.model_path else Path.home() / ".cache/headkv_sglang/models/SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(mdir)
    # KVzipPress refuses eager attention; sdpa is kvpress's default
    model = AutoModelForCausalLM.from_pretrained(mdir, attn_implementation="sdpa", dtype=torch.float32).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    cases = [case(count, a.doc_tokens, a.facts, a.seed + i) for i in range(a.docs)]
    runs, rows = [], []
    full_prefill: dict[int, float] = {}
    for budget in a.budgets:
        ratio = 1 - float(budget.rstrip("%")) / 100
        for name in a.presses:
            row = {"budget": budget, "config": f"kvpress {name}", "right": 0, "asked": 0, "held": 0, "kept": 0.0,
                   "docs": 0,
                   "compress_ms": 0.0, "compressions": 0, "not_supported": None}
            for c in cases:
                doc, qs = chat_prompts(tok, c.text, [f.question for f in c.facts])
                # the pipeline's own split: context = the chat prefix ending with the document
                inp = pipe.preprocess(c.text + "\n\n", [f.question for f in c.facts], "", 100_000)
                ids = inp["context_ids"][0].tolist()
                assert ids == doc and all(ids + q[0].tolist() == full for q, full in zip(inp["questions_ids"], qs)), \
                    "kvpress's prompt tokens differ from the server's"
                r = run_doc(pipe, name, ratio, inp["context_ids"], inp["questions_ids"], a.max_tokens,
                            a.server_dtype_bytes)
                if name == "full":
                    full_prefill[c.seed] = min(full_prefill.get(c.seed, 1e9), r["prefill_s"])
                r["right"] = [correct(f, t) for f, t in zip(c.facts, r["texts"])]
                runs.append({"budget": budget, "press": name, "seed": c.seed, "doc_tokens": len(doc), **r})
                row["right"] += sum(r["right"])
                row["asked"] += len(r["right"])
                row["held"] += r["held"]
                row["kept"] = (row["kept"] * row["docs"] + r["kept"]) / (row["docs"] + 1)
                row["docs"] += 1
                if name != "full":
                    row["compress_ms"] += 1000 * max(r["prefill_s"] - full_prefill.get(c.seed, 0.0), 0.0)
                    row["compressions"] += 1
                save(a, argv, rows + [row], runs)
                print(budget, name, c.seed, r["right"], [t[:40] for t in r["texts"]], f"{r['prefill_s']:.2f}s",
                      flush=True)
            rows.append(row)
    save(a, argv, rows, runs)
    return 0


def save(a, argv: list[str] | None, rows: list[dict], runs: list[dict]) -> None:
    """``OUT.json``, rewritten after every document (a long run keeps what it measured)."""
    import torch
    import transformers

    for r in rows:  # vs full KV over the same documents
        full = next((f for f in rows if f["config"] == "kvpress full" and f["budget"] == r["budget"]), None)
        r["full_held"] = full["held"] * r["docs"] / max(full["docs"], 1) if full else 0

    out = {"command": "python benchmarks/kvpress_peer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()} CPU x{os.cpu_count()}, Python {platform.python_version()}, no GPU",
           "kvpress": importlib.metadata.version("kvpress"), "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": "float32", "presses": a.presses, "rows": rows,
           "runs": runs}
    Path(f"{a.out}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
