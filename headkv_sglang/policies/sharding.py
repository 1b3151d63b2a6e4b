"""Tensor parallelism: one global plan for the whole model, each rank keeps its own heads.

With ``--tp N`` every rank holds ``H_kv / N`` of a layer's KV heads (and the matching
query heads). HeadKV's budgets are one pool over *all* heads, so each rank computes the
plan of the whole model (``plan_budgets`` with the global head count: it depends on the
profile and the positions only, so every rank gets the same plan without talking to
the others) and keeps the rows of its own heads. Scoring needs only the rank's own
query and KV heads (a KV head's scores aggregate its GQA group, which lives on the same
rank). With fewer KV heads than ranks SGLang replicates each KV head on ``tp / H_kv``
ranks, each with part of the head's query group: the replicas then all-gather their
scoring queries (``gather_queries``) and score with the whole group, so every replica
keeps the same tokens. A policy whose budgets depend on the scores of every head of a layer (Ada-KV's
layer-wide contest) gathers the layer's scores from all ranks first (``gather``), so
the ranks again agree on one global allocation.

Nothing here imports SGLang: the serving layer passes the rank, the size and the
``gather`` function (an all-gather over the tensor-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from headkv_sglang.policies.base import CompressedLayer, KVPolicy
from headkv_sglang.policies.budgets import uniform_pages


@dataclass(frozen=True)
class HeadShard:
    """Which heads one tensor-parallel rank holds (SGLang's split: contiguous blocks)."""

    tp_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size), got rank {self.tp_rank} of {self.tp_size}")

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """``[lo, hi)`` of the global KV heads on this rank.

        ``H_kv >= tp``: ``H_kv / tp`` heads each (``H_kv % tp == 0``). ``H_kv < tp``: SGLang
        replicates, each rank holds one head, ``tp / H_kv`` ranks per head.
        """
        h, n = num_kv_heads, self.tp_size
        if h >= n:
            if h % n:
                raise ValueError(f"{h} KV heads cannot be split over --tp {n} (not a multiple)")
            per = h // n
            return self.tp_rank * per, (self.tp_rank + 1) * per
        if n % h:
            raise ValueError(f"--tp {n} cannot replicate {h} KV heads evenly ({n} % {h} != 0)")
        head = self.tp_rank // (n // h)
        return head, head + 1

    def q_heads(self, num_q_heads: int) -> tuple[int, int]:
        if num_q_heads % self.tp_size:
            raise ValueError(f"{num_q_heads} query heads cannot be split over --tp {self.tp_size}")
        per = num_q_heads // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def replicas(self, num_kv_heads: int) -> int:
        """How many ranks hold each KV head (1 unless there are fewer KV heads than ranks)."""
        return max(1, self.tp_size // num_kv_heads)

    def replica_ranks(self, num_kv_heads: int) -> list[int]:
        """The ranks holding this rank's KV heads, in rank order (itself alone unless
        replicated); their query heads, in that order, are the head's whole query group."""
        n = self.replicas(num_kv_heads)
        first = self.tp_rank - self.tp_rank % n
        return list(range(first, first + n))

    def all_ranks(self) -> list["HeadShard"]:
        return [HeadShard(self.tp_size, r) for r in range(self.tp_size)]

    def head_owners(self, num_kv_heads: int) -> list[int]:
        """One rank per distinct block of heads, in head order (the first of the ranks that
        replicate it): the parts of an all-gather that make up ``[H_kv, ...]``."""
        owners: dict[int, int] = {}
        for s in self.all_ranks():
            owners.setdefault(s.kv_heads(num_kv_heads)[0], s.tp_rank)
        return [owners[h] for h in sorted(owners)]


class ShardedPolicy(KVPolicy):
    """``policy`` (built for the whole model) restricted to one rank's KV heads.

    ``plan_budgets`` and ``layer_budgets`` take and return this rank's heads only (what
    ``compress_layer`` and the manager see); internally they compute the global plan and
    slice it. ``gather(scores)`` (``[H_local, T] -> [H_kv, T]``, every rank's scores in
    rank order) is needed by policies that plan from the scores (``plan_budgets``
    returns None, Ada-KV) and by D2O's merge (its threshold is a mean over the layer);
    without it (one rank) the local scores are the global ones. ``gather_queries``
    (``[Hq_local, n, D] -> [G, n, D]``, the replica ranks' queries in rank order) is
    needed when KV heads are replicated (:meth:`HeadShard.replicas`).
    """

    def __init__(self, policy: KVPolicy, shard: HeadShard, num_kv_heads: int,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gather_queries: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if shard.replicas(num_kv_heads) > 1 and gather_queries is None and policy.needs_queries:
            raise ValueError(f"--tp {shard.tp_size} replicates the {num_kv_heads} KV heads: each replica holds part "
                             f"of a head's query group, and {policy.name} scores with the queries; pass "
                             "gather_queries (the replicas' queries, rank order) so that replicas keep the same tokens")
        self.inner = policy
        self.gather_queries = gather_queries if shard.replicas(num_kv_heads) > 1 else None
        self.shard = shard
        self.num_kv_heads = num_kv_heads  # global
        self.lo, self.hi = shard.kv_heads(num_kv_heads)
        self.gather = gather
        self.planned_global: torch.Tensor | None = None  # the whole model's, of the last plan_budgets
        # what compress_layer and the manager read as class attributes
        for attr in ("name", "uses_compensation", "needs_queries", "compresses", "profile_method",
                     "merges_dropped", "links_layers", "row_pages_slack", "window_size"):
            setattr(self, attr, getattr(policy, attr))

    def __getattr__(self, item: str) -> Any:  # hyperparameters (sink_size, beta, ...) read through
        return getattr(self.__dict__["inner"], item)

    @classmethod
    def from_config(cls, cfg, shape, profile):  # pragma: no cover - built around a policy, not from a config
        raise TypeError("ShardedPolicy wraps a built policy: ShardedPolicy(build_policy(cfg, shape), shard, H)")

    # ------------------------------------------------------------------ budgets
    def plan_budgets(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int) -> torch.Tensor | None:
        """This rank's rows ``[L, hi - lo]`` of the global plan (``num_kv_heads``: the global count)."""
        planned = self.inner.plan_budgets(seq_len, budget, num_layers, num_kv_heads)
        self.planned_global = planned
        return None if planned is None else planned[:, self.lo:self.hi].clone()

    def layer_budgets(self, layer: int, seq_len: int, budget: int, scores: torch.Tensor,
                      planned: torch.Tensor | None) -> torch.Tensor:
        if planned is not None:
            return self.inner.layer_budgets(layer, seq_len, budget, scores, planned)
        if self.gather is not None:
            full = self.gather(scores)
            if full.shape != (self.num_kv_heads, seq_len):
                raise ValueError(f"gather returned {list(full.shape)}, expected [{self.num_kv_heads}, {seq_len}]")
        elif self.shard.tp_size == 1:
            full = scores
        else:
            raise RuntimeError(f"{self.inner.name} budgets depend on every head's scores: "
                               f"a ShardedPolicy over --tp {self.shard.tp_size} needs gather")
        return self.inner.layer_budgets(layer, seq_len, budget, full, None)[self.lo:self.hi]

    # ------------------------------------------------------------------ per layer, local heads
    def token_scores(self, q_win, k, layer, q_end=None):
        if self.gather_queries is not None and self.needs_queries:  # replicated head: its whole group
            q_win = self.gather_queries(q_win)
        return (self.inner.token_scores(q_win, k, layer) if q_end is None
                else self.inner.token_scores(q_win, k, layer, q_end=q_end))

    def select_mask(self, scores, budgets):
        return self.inner.select_mask(scores, budgets)

    def select(self, scores, budgets):
        return self.inner.select(scores, budgets)

    def merge_dropped(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      kept: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.merge_dropped(k, v, keep, kept, gather=self.gather)

    def link_layer(self, layer, keep, prev_keep, budget, heads=slice(None)):
        return self.inner.link_layer(layer, keep, prev_keep, budget, heads=slice(self.lo, self.hi))

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        self.inner.check_model(num_layers, num_kv_heads)

    def max_pages(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int) -> int:
        return rank_pages_bound(self.inner, seq_len, budget, num_layers, num_kv_heads, page_size, self.shard)


def rank_pages_bound(policy: KVPolicy, seq_len: int, budget: int, num_layers: int, num_kv_heads: int,
                     page_size: int, shard: HeadShard) -> int:
    """Pages one rank may need at most for a request (``num_kv_heads``: the global count).

    A rank's heads keep at most what the whole request keeps (``policy.max_pages`` over all
    heads) and at most the whole prompt in each of its own rows. The bound is the same on
    every rank (the ranks hold equally many heads), so admission, which must decide the same
    on every rank, reserves it for the busiest one (retrieval heads are not spread evenly).
    """
    lo, hi = shard.kv_heads(num_kv_heads)
    whole = policy.max_pages(seq_len, budget, num_layers, num_kv_heads, page_size)
    rows = num_layers * (hi - lo)
    return min(whole, uniform_pages(rows, seq_len, page_size) + rows * policy.row_pages_slack)
