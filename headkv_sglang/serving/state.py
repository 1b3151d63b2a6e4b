"""ServingState: everything the serving layer knows in one scheduler process.

One object per process, made by :func:`headkv_sglang.serving.install` and handed to
every hook (``functools.partial``), so no module keeps mutable globals. One scheduler =
one model = one compressed pool.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.question import QuestionFinder

# Per-request compression reports kept for clients (the newest ones).
RECENT_REQUESTS = 512


@dataclass
class ServingState:
    cfg: KVPolicyConfig
    shape: ModelShape | None = None
    # token slots moved from SGLang's pool to ours, and what SGLang's pool keeps
    pool_tokens: int = 0
    token_pool_tokens: int = 0
    manager: CompressionManager | None = None
    # name of the SGLang backend the headkv backend wraps ("flashinfer", "torch_native")
    inner_backend: str | None = None
    kernel: str | None = None  # the RaggedAttention kernel: "torch" or "flashinfer"
    scheduler: Any = None
    # --tp N: this rank, and the minimum of an int over the tensor-parallel ranks (None: one rank)
    tp_rank: int = 0
    tp_size: int = 1
    min_over_ranks: Any = None
    gather_objects: Any = None  # every rank's object, in rank order (None: one rank)
    # the chat template's markers, to find each prompt's question (None: not loaded yet)
    questions: QuestionFinder | None = None
    # Per-request state (reservation, pin, pages, the request object and its radix-insert
    # switch to restore) lives in the manager's RequestState (kv/request_state.py), one per row.
    # Scratch of one process_batch_result_prefill call: id(req) of the requests whose prompt
    # completes in the batch being processed (noted BEFORE it, used AFTER it)
    completing: set[int] = field(default_factory=set)
    # requests served uncompressed against their config: reason -> count
    fallbacks: dict[str, int] = field(default_factory=dict)
    # requests left uncompressed by design (compressing would not save memory): reason -> count
    not_compressed: dict[str, int] = field(default_factory=dict)
    # decode batches that ran eagerly instead of replaying a CUDA graph (compressed rows)
    graph_fallback_batches: int = 0
    held: list[Any] = field(default_factory=list)  # held back during one get_new_batch_prefill call
    admission_waits: int = 0
    prefix_waits: int = 0  # steps a request waited for a shared prefix to reach the radix tree
    held_last_pass: int = 0
    # rid -> what compression did to it (the newest RECENT_REQUESTS)
    recent: "OrderedDict[str, dict]" = field(default_factory=OrderedDict)
    metrics: Any = None  # serving.metrics.Metrics, made on first use with --enable-metrics

    def count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def remember(self, rid: str, report: dict) -> None:
        self.recent[rid] = report
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)
