"""Soak: many mixed requests against a deliberately small compressed pool, then leak checks.

    python benchmarks/soak.py --requests 3000 --concurrency 8 --out benchmarks/results/soak_cpu
    python benchmarks/soak.py --server http://127.0.0.1:30000 --requests 300   # an existing server

Each request draws a prompt length (a needle haystack of 40..--max-words words, default 1200), a policy and
budget (via ``custom_params``; 10% plain ``full``), and one of a few shared document
prefixes (radix hits) or a fresh one. 10% are streamed and disconnected after a few
chunks (SGLang aborts them; those with a compressing policy other than razor carry a
``kv_decode_budget`` and run 64 chunks, long enough for their generated tokens to move
into their pages), 5% carry deliberately invalid ``custom_params`` (must be HTTP
400); a quarter of the compressing ones carry ``kv_share`` (each leaves its compressed prompt
shared: idle shared prompts fill the small pool and must be evicted on demand). Every
completed request with >= 16 new tokens is checked for its needle's number:
asserted (>= 90%) for the ``full`` policy; reported, not asserted, for the compressed ones
(lossy policies may miss). At the end, with the server idle, no shared prompt is still read;
after a cache flush (which frees the shared prompts): the compressed pool's
``check_integrity()`` passes, it holds zero pages, the admission reservations are zero,
SGLang's token pool has every slot back (available + evictable cache == total), and the
server is healthy. Exit code 0 only if all of that holds, no request got an
unexpected error, and none fell back to uncompressed KV (every request here fits the pool,
so admission must have queued it until its pages were free).
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headkv_sglang.dev import models  # noqa: E402
from headkv_sglang.dev.haystack import haystack, needle_prompt  # noqa: E402
from headkv_sglang.dev.server import SGLangServer  # noqa: E402
from benchmarks.niah import machine  # noqa: E402

POLICIES = ["headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor", "d2o", "pod"]
BAD_PARAMS = [{"kv_policy": "nope"}, {"kv_budget": -1}, {"kv_budget": "x"}, {"kv_bogus": 1}, {"kv_window": 1 << 30}]
# The small pool: SGLang's token pool of 12k slots, 10% of it moved to the compressed pool
# (~1.2k token-equivalents: a handful of compressed requests), so admission has to queue.
SERVER_ARGS = ["--kv-policy", "headkv", "--kv-budget", "64", "--max-total-tokens", "12000",
               "--kv-pool-fraction", "0.1", "--chunked-prefill-size", "512", "--sleep-on-idle"]
# --memory shared: one memory of 6000 token slots for SGLang's requests and the compressed
# pages alike (half the split server's capacity, so SGLang's admission has to queue there too)
SHARED_SERVER_ARGS = ["--kv-policy", "headkv", "--kv-budget", "64", "--max-total-tokens", "6000",
                      "--kv-memory", "shared", "--chunked-prefill-size", "512", "--sleep-on-idle"]


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:  # timeouts, refused/reset connections
        return -1, repr(e)


def make_request(i: int, seed: int, max_words: int = 1200) -> dict:
    rng = random.Random(seed * 1_000_003 + i)
    r = rng.random()
    kind = "abort" if r < 0.10 else "invalid" if r < 0.15 else "normal"
    words = rng.randint(40, max_words)
    needle = needle_prompt(words, depth=rng.random(), seed=rng.randrange(1 << 30))
    prompt = needle.prompt
    if rng.random() < 0.3:  # a shared document prefix: radix-cache hits across requests
        prefix = " ".join(haystack(400, seed=rng.randrange(4)))
        prompt = prefix + "\n\n" + prompt
    params: dict = {}
    if kind == "invalid":
        params = dict(rng.choice(BAD_PARAMS))
    elif rng.random() < 0.9:
        params = {"kv_policy": rng.choice(POLICIES), "kv_budget": rng.choice([16, 32, 64, 128, 256])}
    else:
        params = {"kv_policy": "full"}
    # kv_share on some compressing requests (their own draws: the rest of the mix is unchanged):
    # each leaves its compressed prompt shared, so the small pool fills with idle shared
    # prompts that admission and compression must evict
    if kind != "invalid" and params.get("kv_policy") not in ("full", None) \
            and random.Random(seed * 7_919 + i).random() < 0.25:
        params["kv_share"] = True
    abort_after = 3
    if kind == "abort" and params.get("kv_policy") not in ("full", "razor", None) and not params.get("kv_share"):
        # a long output whose generated tokens move into its pages, aborted mid-way
        params["kv_decode_budget"] = rng.choice([16, 32])
        abort_after = 64
    return {"i": i, "kind": kind, "prompt": prompt, "answer": needle.answer, "params": params,
            "max_tokens": rng.choice([1, 8, 16, 24]) if kind != "abort" else 400, "abort_after": abort_after}


def run_one(url: str, spec: dict) -> dict:
    body = {"model": "default", "messages": [{"role": "user", "content": spec["prompt"]}],
            "max_tokens": spec["max_tokens"], "temperature": 0, "custom_params": spec["params"]}
    out = {"i": spec["i"], "kind": spec["kind"], "policy": spec["params"].get("kv_policy")}
    t0 = time.perf_counter()
    if spec["kind"] == "abort":
        body.update(stream=True, ignore_eos=True)
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                chunks = 0
                for line in resp:
                    if line.startswith(b"data: {"):
                        chunks += 1
                        if chunks >= spec["abort_after"]:
                            break  # disconnect mid-stream
            out["status"] = 200
        except Exception as e:  # noqa: BLE001
            out["status"], out["error"] = -1, repr(e)
    else:
        status, resp = post(f"{url}/v1/chat/completions", body)
        out["status"] = status
        if status == 200:
            out["text"] = resp["choices"][0]["message"]["content"]
            out["correct"] = spec["answer"] in out["text"]
            out["checked"] = spec["max_tokens"] >= 16
        else:
            out["error"] = str(resp)[:300]
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def wait_idle(srv_url: str, timeout: float = 300, pages_left_ok: bool = False) -> dict:
    """The server's state once no request runs and (unless ``pages_left_ok``) the pool is empty."""
    deadline = time.time() + timeout
    st: dict = {}
    while time.time() < deadline:
        with urllib.request.urlopen(f"{srv_url}/server_info", timeout=60) as r:
            st = json.loads(r.read())["internal_states"][0]["headkv_sglang"]
        if st["token_pool"]["running_requests"] == 0 and (pages_left_ok or st["pool"]["used_pages"] == 0):
            return st
        time.sleep(0.5)
    return st


def soak(url: str, n: int, concurrency: int, seed: int, progress: bool = True, max_words: int = 1200) -> dict:
    from tqdm import tqdm

    specs = [make_request(i, seed, max_words) for i in range(n)]
    results: list[dict] = []
    lock = threading.Lock()
    bar = tqdm(total=n, desc="soak", unit="req", disable=not progress)

    def task(spec):
        r = run_one(url, spec)
        with lock:
            results.append(r)
            bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(task, specs))
    bar.close()
    wall = time.perf_counter() - t0
    shared = wait_idle(url, pages_left_ok=True).get("shared", {})  # what kv_share left shared, before the flush
    flush = urllib.request.Request(f"{url}/flush_cache", method="POST")
    with urllib.request.urlopen(flush, timeout=60) as r:
        flushed = r.status == 200
    st = wait_idle(url)
    tp = st["token_pool"]
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        healthy = r.status == 200

    unexpected = [r for r in results if (r["kind"] == "invalid") != (r["status"] == 400) and r["kind"] != "abort"
                  or (r["kind"] == "abort" and r["status"] != 200)]
    checked_full = [r for r in results if r["kind"] == "normal" and r.get("checked") and r["policy"] == "full"]
    checked_comp = [r for r in results if r["kind"] == "normal" and r.get("checked") and r["policy"] != "full"]
    summary = {
        "requests": n, "concurrency": concurrency, "seed": seed, "max_words": max_words, "wall_s": round(wall, 1),
        "kinds": dict(Counter(r["kind"] for r in results)),
        "status": dict(Counter(str(r["status"]) for r in results)),
        "unexpected_errors": len(unexpected), "unexpected_samples": unexpected[:5],
        "full_answers_checked": len(checked_full), "full_answers_correct": sum(r["correct"] for r in checked_full),
        "compressed_answers_checked": len(checked_comp),
        "compressed_answers_correct": sum(r["correct"] for r in checked_comp),
        "pool_used_pages": st["pool"]["used_pages"], "integrity": st["integrity"],
        "reserved_pages": st.get("admission", {}).get("reserved_pages"),
        "admission_waits": st.get("admission", {}).get("waits"),
        "fallbacks": st.get("fallbacks"),
        "token_pool": tp, "token_slots_leaked": tp["total"] - tp["available"] - tp["evictable"],
        "compressed_requests_total": sum(p.get("compressed_requests_total", 0) for p in st.get("policies", {}).values()),
        "decode": st.get("decode"),  # decode-phase compression (the long aborted outputs)
        "shared": shared,  # kv_share before the final cache flush: prompts left shared, totals
        "shared_requests": sum(1 for sp in specs if sp["params"].get("kv_share")),
        "healthy": healthy, "flushed": flushed,
    }
    summary["ok"] = bool(
        healthy and flushed and not unexpected and not shared.get("in_use") and st["integrity"] == "ok" and st["pool"]["used_pages"] == 0
        and summary["reserved_pages"] == 0 and summary["token_slots_leaked"] == 0 and not summary["fallbacks"]
        and not (st.get("decode") or {}).get("errors") and not (st.get("decode") or {}).get("pages_promised")
        and summary["full_answers_correct"] >= 0.9 * max(1, len(checked_full))
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-words", type=int, default=1200,
                   help="haystack words per request drawn from 40..N (~1.5 tokens per word)")
    p.add_argument("--server", default=None, help="an existing --kv-policy server (default: start one)")
    p.add_argument("--memory", choices=["split", "shared"], default="split",
                   help="the started server's --kv-memory: split (a small compressed pool of its own) or "
                        "shared (one memory)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    srv = None
    server_args = SHARED_SERVER_ARGS if a.memory == "shared" else SERVER_ARGS
    try:
        if a.server is None:
            log = Path(a.out + ".server.log") if a.out else Path("/tmp/headkv_soak_server.log")
            srv = SGLangServer(models.model_dir(), server_args, log_path=log).start()
            url = srv.url
        else:
            url = a.server.rstrip("/")
        summary = soak(url, a.requests, a.concurrency, a.seed, progress=not a.no_progress, max_words=a.max_words)
    finally:
        if srv is not None:
            srv.stop()
    summary["command"] = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary["server_args"] = server_args if a.server is None else "external"
    summary["machine"] = machine()
    print(json.dumps({k: v for k, v in summary.items() if k != "unexpected_samples"}, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".json").write_text(json.dumps(summary, indent=2) + "\n")
        server_desc = " ".join(server_args) if a.server is None else a.server
        Path(a.out + ".md").write_text(
            f"# Soak\n\n`{summary['command']}` on {summary['machine']}\n\nServer: `{server_desc}`\n\n"
            f"- {summary['requests']} requests ({summary['kinds']}), concurrency {summary['concurrency']}, "
            f"wall {summary['wall_s']} s\n- HTTP status counts: {summary['status']}; unexpected errors: "
            f"{summary['unexpected_errors']}\n- leaks after idle: compressed pool {summary['pool_used_pages']} pages, "
            f"token slots {summary['token_slots_leaked']}, reserved pages {summary['reserved_pages']}; integrity "
            f"{summary['integrity']}\n- answers: full {summary['full_answers_correct']}/{summary['full_answers_checked']}"
            f", compressed {summary['compressed_answers_correct']}/{summary['compressed_answers_checked']} "
            f"(lossy; not asserted)\n- admission waits: {summary['admission_waits']}; fallbacks: "
            f"{summary['fallbacks']}\n- verdict: {'PASS' if summary['ok'] else 'FAIL'}\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
