"""In-process, no server: what the compressed pool's bookkeeping costs at GPU scale.

A Llama-3-8B-shaped server (32 layers x 8 KV heads, 16-token pages) with a 200k-token pool
has ~3.2M pages; a request compressed to 1024 tokens per (layer, KV head) holds 32 x 8 x 64 =
16384 of them. This times, on such a pool (the page storage itself shrunk to 1-element pages:
only the bookkeeping is measured):

* ``PageAllocator(num_pages)``: start-up;
* ``allocate`` / ``free`` of one request's pages on a half-full, fragmented pool;
* ``/server_info``'s serving section (``serving.metrics.report``) and the Prometheus update
  (``Manager.stats``), with the integrity walk off (the default) and on
  (``HEADKV_SGLANG_CHECK_INTEGRITY=1``);
* the full integrity walk (``CompressionManager.check_integrity``) alone.

``python benchmarks/pool_bookkeeping.py --pages 3200000 --request-pages 16384`` (one row per
measurement, milliseconds, median of ``--repeats``); ``--out FILE.json`` saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headkv_sglang.config import KVPolicyConfig, ModelShape  # noqa: E402
from headkv_sglang.kv.manager import CompressionManager  # noqa: E402
from headkv_sglang.kv.pool import PageAllocator, RequestPages  # noqa: E402
from headkv_sglang.serving import metrics  # noqa: E402
from headkv_sglang.serving.state import ServingState  # noqa: E402

SHAPE = ModelShape(num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=1, architecture="LlamaForCausalLM")


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def fill(m: CompressionManager, request_pages: int, fraction: float, rng: random.Random) -> None:
    """Hold ``fraction`` of the pool in requests of ``request_pages`` pages, freeing every
    third one on the way so the free list is fragmented."""
    idx = 0
    while m.allocator.used_pages + request_pages <= fraction * m.allocator.num_pages:
        ids = m.allocator.allocate(request_pages, owner=idx)
        m.records[idx] = RequestPages(prompt_len=16000, policy="headkv", budget=1024, page_ids=ids)
        if rng.random() < 1 / 3:
            m.free(idx)
        idx += 1


def run(pages: int, request_pages: int, repeats: int) -> dict:
    rng = random.Random(0)
    rows: dict[str, float] = {}
    rows["PageAllocator(num_pages)"] = timed(lambda: PageAllocator(pages), max(1, repeats // 5))
    m = CompressionManager(SHAPE, pages, 1, torch.float16, "cpu")
    fill(m, request_pages, 0.5, rng)
    owner = "bench"

    def round_trip() -> None:
        ids = m.allocator.allocate(request_pages, owner=owner)
        m.allocator.free(ids, owner=owner)

    rows[f"allocate({request_pages}) + free({request_pages})"] = timed(round_trip, repeats)
    state = ServingState(cfg=KVPolicyConfig(policy="headkv"), manager=m)
    before = os.environ.pop("HEADKV_SGLANG_CHECK_INTEGRITY", None)
    try:
        rows["metrics.report (server_info)"] = timed(lambda: metrics.report(state), repeats)
        os.environ["HEADKV_SGLANG_CHECK_INTEGRITY"] = "1"
        rows["metrics.report, HEADKV_SGLANG_CHECK_INTEGRITY=1"] = timed(lambda: metrics.report(state), max(1, repeats // 5))
    finally:
        os.environ.pop("HEADKV_SGLANG_CHECK_INTEGRITY", None)
        if before is not None:
            os.environ["HEADKV_SGLANG_CHECK_INTEGRITY"] = before
    rows["manager.stats (Prometheus update)"] = timed(m.stats, repeats)
    rows["manager.check_integrity (full walk)"] = timed(m.check_integrity, max(1, repeats // 5))
    return {"pages": pages, "request_pages": request_pages, "used_pages": m.allocator.used_pages,
            "running_requests": len(m.records), "repeats": repeats, "ms": rows,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=3_200_000, help="pool pages (default: 200k tokens of a Llama-3-8B)")
    ap.add_argument("--request-pages", type=int, default=16384, help="pages of one request (default: 1024 per head)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--out", type=Path, help="save the rows as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.pages, args.request_pages, args.repeats)
    print(f"{res['pages']} pages, {res['used_pages']} used by {res['running_requests']} requests; {res['machine']}")
    for name, ms in res["ms"].items():
        print(f"  {name:55s} {ms:10.3f} ms")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
