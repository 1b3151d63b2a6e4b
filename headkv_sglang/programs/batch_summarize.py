"""Batch summarization job: a JSONL of documents in, a JSONL of summaries out.

    python -m headkv_sglang.programs.batch_summarize --input docs.jsonl --output summaries.jsonl \\
        [--server URL | --engine --model-path DIR] --concurrency 4 \\
        [--kv-policy headkv --kv-budget 128]

Input lines: ``{"id": ..., "text": ...}`` (``id`` optional: ``line-N`` is used). Each
document is summarized by :class:`headkv_sglang.programs.summarize.Summarizer` (single pass, or
map-reduce past the model's context), with its key names (``--key-names``, see
``headkv_sglang.programs.summarize``) given to the model. Output lines: ``{"id", "summary", "mode",
"document_tokens", "key_names", "prompt_tokens",
"completion_tokens", "kv_held_bytes", "kv_full_bytes", "seconds"}``, or ``{"id", "error"}``
for a document that failed (a malformed line, a server error): it is recorded and the job
goes on. Resumable: ids already in the output are skipped (``--retry-failed`` redoes the
failed ones), and each result is appended and flushed as it completes, so an interrupted
job loses only the documents in flight. Prints final statistics; exit code 1 if any
document failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from headkv_sglang.programs.endpoint import DEFAULT_URL, KVEndpoint, budget_arg, fmt_bytes
from headkv_sglang.programs.summarize import DEFAULT_KEY_NAMES, Summarizer


@dataclass
class Job:
    id: str
    text: str | None
    error: str | None = None  # set for a malformed input line


@dataclass
class Stats:
    documents: int = 0
    failed: int = 0
    skipped: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    kv_held: int = 0
    kv_full: int = 0
    failures: list[str] = field(default_factory=list)


def read_jobs(path: Path) -> list[Job]:
    jobs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            text = obj.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("missing or empty \"text\"")
            doc_id = str(obj.get("id", f"line-{n}"))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            jobs.append(Job(f"line-{n}", None, f"malformed input line {n}: {e}"))
            continue
        if doc_id in seen:
            jobs.append(Job(f"line-{n}", None, f"duplicate id {doc_id!r} on line {n}"))
            continue
        seen.add(doc_id)
        jobs.append(Job(doc_id, text))
    return jobs


def read_done(path: Path, retry_failed: bool) -> set[str]:
    done: set[str] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut by an interruption: that document is redone
        if "id" in obj and not (retry_failed and "error" in obj):
            done.add(str(obj["id"]))
    return done


def run(jobs: list[Job], out_path: Path, summarizer: Summarizer, *, concurrency: int, mode: str,
        retry_failed: bool = False, progress: bool = True) -> Stats:
    stats = Stats()
    done = read_done(out_path, retry_failed)
    todo = [j for j in jobs if j.id not in done]
    stats.skipped = len(jobs) - len(todo)
    lock = threading.Lock()
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> dict:
        if job.error:
            return {"id": job.id, "error": job.error}
        t0 = time.perf_counter()
        try:
            s = summarizer.summarize(job.text, mode)
        except Exception as e:  # noqa: BLE001 - recorded, and the job goes on
            return {"id": job.id, "error": f"{type(e).__name__}: {e}"}
        return {"id": job.id, "summary": s.summary, "mode": s.mode, "document_tokens": s.document_tokens,
                "key_names": s.key_names,
                "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "kv_held_bytes": s.kv.get("held_bytes", 0), "kv_full_bytes": s.kv.get("full_bytes", 0),
                "seconds": round(time.perf_counter() - t0, 2)}

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="summarizing", unit="doc", disable=not progress)
    with open(out_path, "a") as out, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(one, j) for j in todo]
        for fut in as_completed(futures):
            rec = fut.result()
            with lock:
                out.write(json.dumps(rec) + "\n")
                out.flush()
            stats.documents += 1
            if "error" in rec:
                stats.failed += 1
                stats.failures.append(f"{rec['id']}: {rec['error']}")
            else:
                stats.tokens_in += rec["prompt_tokens"]
                stats.tokens_out += rec["completion_tokens"]
                stats.kv_held += rec["kv_held_bytes"]
                stats.kv_full += rec["kv_full_bytes"]
            bar.update(1)
    bar.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.programs.batch_summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL of results (appended; resumable)")
    p.add_argument("--concurrency", type=int, default=4, help="documents in flight (default %(default)s)")
    p.add_argument("--mode", default="auto", choices=["auto", "single", "map-reduce", "refine"])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--key-names", type=int, default=DEFAULT_KEY_NAMES, metavar="N",
                   help="give the model each document's N most frequent proper names to mention "
                        "(see headkv_sglang.programs.summarize; 0: off; default %(default)s)")
    p.add_argument("--retry-failed", action="store_true", help="redo documents recorded with an error")
    p.add_argument("--server", default=DEFAULT_URL, help="SGLang server URL (default %(default)s)")
    p.add_argument("--engine", action="store_true", help="run in-process on SGLang's offline Engine instead")
    p.add_argument("--model-path", default=None, help="with --engine: the model (default: the test model)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --engine: an extra ServerArgs keyword, e.g. max_total_tokens=65536")
    p.add_argument("--kv-policy", default=None, help="with --server: per request; with --engine: the engine's policy")
    p.add_argument("--kv-budget", type=budget_arg, default=None, help="tokens per KV head (128) or a share of each prompt (5%%)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {a.concurrency}")
    if a.key_names < 0:
        p.error(f"--key-names must be >= 0, got {a.key_names}")
    if not a.input.is_file():
        p.error(f"--input: no such file {a.input}")

    jobs = read_jobs(a.input)
    t0 = time.perf_counter()
    backend = None
    try:
        if a.engine:
            from headkv_sglang.dev import models
            from headkv_sglang.engine import kv_engine
            from headkv_sglang.programs.endpoint import EngineBackend

            extra = {}
            for kv in a.engine_arg:
                k, _, v = kv.partition("=")
                extra[k] = int(v) if v.isdigit() else v
            model_path = a.model_path or str(models.model_dir())
            kv = {"kv_policy": a.kv_policy or "full", "kv_budget": a.kv_budget}
            backend = EngineBackend(kv_engine(model_path, **kv, **extra))
        else:
            backend = KVEndpoint(a.server, kv_policy=a.kv_policy, kv_budget=a.kv_budget)
        summarizer = Summarizer(backend, max_tokens=a.max_tokens, num_threads=1, key_names=a.key_names)
        stats = run(jobs, a.output, summarizer, concurrency=a.concurrency, mode=a.mode,
                    retry_failed=a.retry_failed, progress=not a.no_progress)
    finally:
        if a.engine and backend is not None:
            backend.shutdown()
    wall = time.perf_counter() - t0
    print(f"documents: {stats.documents} done ({stats.failed} failed), {stats.skipped} already in {a.output}")
    print(f"tokens: {stats.tokens_in} in, {stats.tokens_out} out; wall time {wall:.1f} s")
    if stats.kv_full:
        print(f"KV: held {fmt_bytes(stats.kv_held)} instead of {fmt_bytes(stats.kv_full)} "
              f"(saved {fmt_bytes(stats.kv_full - stats.kv_held)}, {stats.kv_full / max(stats.kv_held, 1):.1f}x)")
    for f in stats.failures:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
