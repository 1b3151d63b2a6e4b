"""What the compression manager reports: ``/server_info``'s pool, policy, shared-prompt and
decode-move figures (:meth:`ManagerStats.stats`). A mixin of
:class:`~headkv_sglang.kv.manager.CompressionManager`; pure Python.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass
class PolicyStats:
    compressed_requests: int = 0
    held_bytes: int = 0
    full_bytes: int = 0  # what the running compressed requests' prompts take uncompressed
    kept_tokens: int = 0
    prompt_head_tokens: int = 0


class ManagerStats:
    """The observability part of the manager (reads its records, shared prompts and totals)."""

    def stats(self) -> dict:
        per: dict[str, PolicyStats] = defaultdict(PolicyStats)
        bpp = self.pool.bytes_per_page
        with self._lock:
            for rec in list(self.records.values()):
                st = per[rec.policy]
                st.held_bytes += rec.held_bytes(bpp)
                st.full_bytes += self.full_bytes(rec.prompt_len)
                st.kept_tokens += rec.kept_tokens
                st.prompt_head_tokens += rec.prompt_len * self.shape.num_layers * self.shape.num_kv_heads
            shared = self.shared_prefixes()
            for e in shared:  # pages read by running requests count once, with their policy
                if e.refs:
                    per[e.record.policy].held_bytes += e.record.held_bytes(bpp)
            running = len(self.records)
            # held by requests and shared prompts; with one memory free + used < num_pages when
            # SGLang uses slots (num_pages: what every slot would hold as pages)
            free_pages, used_pages = self.allocator.free_pages, self.allocator.used_pages
        policies = {}
        for name in set(per) | set(self.total_compressed):
            st = per[name]
            policies[name] = {
                "compressed_requests_total": self.total_compressed.get(name, 0),
                "running_compressed_requests": sum(1 for r in list(self.records.values()) if r.policy == name),
                "held_bytes": st.held_bytes,
                "full_kv_bytes": st.full_bytes,
                "ratio": (st.full_bytes / st.held_bytes) if st.held_bytes else None,
                "kept_fraction": (st.kept_tokens / st.prompt_head_tokens) if st.prompt_head_tokens else None,
                "cumulative_kept_fraction": (self.cumulative[name][0] / self.cumulative[name][1])
                if self.cumulative[name][1] else None,
                "cumulative_ratio": (self.cumulative[name][3] / self.cumulative[name][2])
                if self.cumulative[name][2] else None,
            }
        return {
            "pool": {
                "num_pages": self.allocator.num_pages,
                "page_size": self.pool.page_size,
                "free_pages": free_pages,
                "used_pages": used_pages,
                "bytes_per_page": bpp,
                "capacity_bytes": self.allocator.num_pages * bpp,
            },
            "running_compressed_requests": running,
            "policies": policies,
            # kv_share: compressed prompts shared across requests (now, and totals since start)
            "shared": {"prefixes": len(shared), "in_use": sum(1 for e in shared if e.refs),
                       "pages": sum(len(e.record.page_ids) for e in shared),
                       "idle_pages": sum(len(e.record.page_ids) for e in shared if not e.refs),
                       "readers": sum(len(e.refs) for e in shared),
                       **{f"{k}_total": int(self.shared_totals.get(k, 0)) for k in ("published", "adopted", "evicted")}},
            # decode-phase compression since start (policies/decode.py)
            "decode": {**{k: int(self.decode_totals.get(k, 0)) for k in
                          ("compressions", "tokens_moved", "head_tokens_dropped", "head_tokens_merged", "pool_full",
                           "errors")},
                       "ms": round(self.decode_totals.get("ms", 0.0), 1),
                       "pages_promised": self.decode_pages_pending()},
        }


