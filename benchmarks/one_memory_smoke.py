"""A hand check of ``--kv-memory shared`` on a real server (not part of the test suite).

Starts one server on the test model with ``--kv-memory shared``, sends a long needle
document and a few shorter requests (at once), and reads ``/server_info``'s one-memory
view before, during (after the first answer) and after: compressed pages borrow SGLang's
slots in chunks, and every borrowed slot is back in SGLang's allocator once the requests
are done. Writes ``benchmarks/results/one_memory_smoke.{json,md}``.

    python benchmarks/one_memory_smoke.py [--port 31234] [--words 1500]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path

from headkv_sglang.dev.haystack import needle_prompt
from headkv_sglang.dev.models import model_dir
from headkv_sglang.dev.server import SGLangServer

RESULTS = Path(__file__).parent / "results"


def memory(srv: SGLangServer) -> dict:
    st = srv.get_json("/server_info", timeout=600)["internal_states"][0]["headkv_sglang"]
    return {"memory": st.get("memory"), "integrity": st.get("integrity"),
            "running_compressed_requests": st.get("running_compressed_requests"),
            "fallbacks": st.get("fallbacks")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--words", type=int, default=1500)
    ap.add_argument("--budget", default="64")
    a = ap.parse_args()
    model = model_dir()
    args = ["--max-total-tokens", "16384", "--kv-policy", "snapkv", "--kv-budget", a.budget,
            "--kv-memory", "shared", "--kv-page-size", "16"]
    log = RESULTS / "one_memory_smoke.server.log"  # not committed (.gitignore)
    out: dict = {"command": " ".join([sys.executable, *sys.argv]), "server_args": args,
                 "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (shared machine)"}
    env = {"HEADKV_SGLANG_CHECK_INTEGRITY": "1"}
    with SGLangServer(model, args, port=a.port, log_path=log, env=env) as srv:  # __enter__ starts it
        out["before"] = memory(srv)
        needle = needle_prompt(a.words, 0.4, seed=3)
        prompts = [needle.prompt] + [needle_prompt(n, 0.5, seed=s).prompt for s, n in ((5, 300), (6, 500), (7, 200))]

        def ask(p: str):
            t0 = time.time()
            code, body = srv.post_json("/v1/chat/completions", {
                "model": "default", "messages": [{"role": "user", "content": p}], "max_tokens": 24,
                "temperature": 0})
            text = body["choices"][0]["message"]["content"] if code == 200 else body
            return code, text, body.get("usage", {}).get("prompt_tokens"), time.time() - t0

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(ask, p) for p in prompts]
            out["during"] = memory(srv)  # the moment most slots were lent to pages, polled
            while not all(f.done() for f in futs):
                now = memory(srv)
                if ((now["memory"] or {}).get("slots_borrowed_by_pages") or 0) > \
                        ((out["during"]["memory"] or {}).get("slots_borrowed_by_pages") or 0):
                    out["during"] = now
                time.sleep(2)
            answers = [f.result() for f in futs]
        out["answers"] = [{"status": c, "prompt_tokens": n, "text": t, "seconds": round(s, 1)}
                          for c, t, n, s in answers]
        out["needle"] = needle.answer
        out["needle_found"] = bool(out["needle"]) and str(out["needle"]) in str(answers[0][1])
        time.sleep(2)
        out["after"] = memory(srv)
        srv.flush_cache()
        time.sleep(1)
        out["after_flush"] = memory(srv)
    m = out["after_flush"]["memory"] or {}
    out["ok"] = bool(m) and m.get("slots_borrowed_by_pages") == 0 and m.get("slots_free") == m.get("slots_total") \
        and m.get("borrowed_chunks", 0) > 0 and m.get("borrowed_chunks") == m.get("returned_chunks")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "one_memory_smoke.json").write_text(json.dumps(out, indent=2, default=str))
    lines = ["# --kv-memory shared: a hand check on a real server", "",
             f"Command: `{out['command']}`  ", f"Server: `{' '.join(args)}` (test model, CPU)  ",
             f"Machine: {out['machine']}", "", "| moment | slots total | free | evictable | SGLang's | pages' | "
             "pages used | chunks borrowed / returned | integrity |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in ("before", "during", "after", "after_flush"):
        mm = out[k]["memory"] or {}
        lines.append(f"| {k} | {mm.get('slots_total')} | {mm.get('slots_free')} | {mm.get('slots_evictable')} | "
                     f"{mm.get('slots_used_by_sglang')} | {mm.get('slots_borrowed_by_pages')} | {mm.get('pages_used')} | "
                     f"{mm.get('borrowed_chunks')} / {mm.get('returned_chunks')} | {out[k]['integrity']} |")
    lines += ["", f"Answers (prompt tokens: {[x['prompt_tokens'] for x in out['answers']]}); needle "
              f"{out['needle']!r} found in the long one: {out['needle_found']}. All slots back: {out['ok']}."]
    (RESULTS / "one_memory_smoke.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
