"""What the serving layer reports: Prometheus gauges and the ``/server_info`` section.

Both run inside SGLang's scheduler loop, so both cost O(running requests), never O(pool
pages): a Llama-3-8B-shaped pool of 200k tokens is ~3M pages. ``integrity`` is checked from
the allocator's counters (every owner's page count equals its table's, no page leaked);
with ``HEADKV_SGLANG_CHECK_INTEGRITY=1`` in the server's environment it is the full page
walk (``CompressionManager.check_integrity``) instead (debugging; the test suite's servers
run with it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")

# /server_info walks every page (O(pool)) instead of checking the counters (O(requests)).
CHECK_INTEGRITY_ENV = "HEADKV_SGLANG_CHECK_INTEGRITY"


def full_integrity_walk() -> bool:
    """Whether ``HEADKV_SGLANG_CHECK_INTEGRITY`` asks for the full walk (read on every report)."""
    v = os.environ.get(CHECK_INTEGRITY_ENV, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{CHECK_INTEGRITY_ENV}={v!r}: expected 1 (walk every page on each /server_info) or 0")


def check_counts(m: CompressionManager) -> None:
    """The O(requests) integrity check: every owner's page count (requests, shared prefixes)
    equals what its table lists, and free + held pages make the pool. AssertionError if not."""
    owned: dict[object, int] = {idx: len(rec.page_ids) for idx, rec in list(m.records.items()) if rec.page_ids}
    for e in m.shared_prefixes():
        owned[e] = len(e.record.page_ids)
    m.allocator.check_counts(owned)


class Metrics:
    """Prometheus gauges (only with SGLang's --enable-metrics, which sets PROMETHEUS_MULTIPROC_DIR).

    Every series carries ``tp_rank``: with ``--tp N`` each rank has its own pool (and counts
    the requests it compressed: each request once per rank)."""

    def __init__(self, tp_rank: int = 0) -> None:
        from prometheus_client import Counter, Gauge

        self.rank = str(tp_rank)
        labels = ["policy", "tp_rank"]
        self.compressed = Counter("sglang:headkv_compressed_requests", "Requests whose prompt KV was compressed", labels)
        self.held = Gauge("sglang:headkv_held_bytes", "KV bytes held in the compressed pool by running requests",
                          labels, multiprocess_mode="mostrecent")
        self.full = Gauge("sglang:headkv_full_kv_bytes", "KV bytes the same prompts take uncompressed",
                          labels, multiprocess_mode="mostrecent")
        self.ratio = Gauge("sglang:headkv_compression_ratio", "full_kv_bytes / held_bytes of running requests",
                           labels, multiprocess_mode="mostrecent")
        self.used_pages = Gauge("sglang:headkv_pool_used_pages", "Pages in use in the compressed pool",
                                ["tp_rank"], multiprocess_mode="mostrecent")
        self.policies: set[str] = set()

    def update(self, manager: CompressionManager, compressed_policy: str | None = None) -> None:
        if compressed_policy:
            self.compressed.labels(policy=compressed_policy, tp_rank=self.rank).inc()
        st = manager.stats()
        self.used_pages.labels(tp_rank=self.rank).set(st["pool"]["used_pages"])
        self.policies |= set(st["policies"])
        for pol in self.policies:
            d = st["policies"].get(pol, {})
            self.held.labels(policy=pol, tp_rank=self.rank).set(d.get("held_bytes", 0))
            self.full.labels(policy=pol, tp_rank=self.rank).set(d.get("full_kv_bytes", 0))
            self.ratio.labels(policy=pol, tp_rank=self.rank).set(d.get("ratio") or 0)


def update(state: ServingState, compressed_policy: str | None = None) -> None:
    if state.manager is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        if state.metrics is None:
            state.metrics = Metrics(state.tp_rank)
        state.metrics.update(state.manager, compressed_policy)
    except Exception:  # metrics must never break serving
        logger.exception("headkv_sglang: metrics update failed")


def report(state: ServingState) -> dict[str, Any]:
    """The serving part of ``internal_states[i]["headkv_sglang"]`` in ``/server_info``."""
    m = state.manager
    out: dict[str, Any] = {
        "policy": state.cfg.policy,
        "config": state.cfg.as_dict(),
        "backend_installed": state.inner_backend is not None,
        "attention_backend": {"wraps": state.inner_backend, "ragged_kernel": state.kernel,
                              "graph_fallback_batches": state.graph_fallback_batches},
        "tensor_parallel": {"tp_rank": state.tp_rank, "tp_size": state.tp_size,
                            "kv_heads": list(m.shard.kv_heads(m.global_shape.num_kv_heads))
                            if m is not None and m.shard is not None else None},
        "token_pool_tokens": state.token_pool_tokens,
        "compressed_pool_token_equivalents": state.pool_tokens,
        "fallbacks": dict(state.fallbacks),
        "not_compressed": dict(state.not_compressed),
        "recent_requests": dict(state.recent),
        "admission": {"waits": state.admission_waits, "held_last_pass": state.held_last_pass,
                      "prefix_waits": state.prefix_waits,
                      "reserved_pages": m.reserved_pages() if m is not None else 0},
    }
    from headkv_sglang.serving.one_memory import memory_report

    memory = memory_report(state)
    if memory is not None:
        out["memory"] = memory
    if m is not None:
        out.update(m.stats())
        out["peak_running_compressed_requests_since_last_read"] = m.take_peak_records()
        try:
            walk = full_integrity_walk()
            out["integrity_check"] = "pages" if walk else "counts"
            if walk:
                m.check_integrity()
            else:
                check_counts(m)
            out["integrity"] = "ok"
        except (AssertionError, ValueError) as e:
            out["integrity"] = f"FAILED: {e}"
    if state.gather_objects is not None:
        mine = {"tp_rank": state.tp_rank, "integrity": out.get("integrity"),
                "running_compressed_requests": out.get("running_compressed_requests"), **out.get("pool", {})}
        if memory is not None:  # lockstep: every rank has as many slots lent to pages
            mine["slots_borrowed_by_pages"] = memory["slots_borrowed_by_pages"]
        out["tp_ranks"] = state.gather_objects(mine)
    return out
