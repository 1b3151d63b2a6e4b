"""Tensor parallelism (``--tp N``): this rank's place, and the collectives the serving layer needs.

Each rank runs its own scheduler, pool and compression over its own KV heads
(:class:`~headkv_sglang.policies.sharding.HeadShard`). SGLang keeps the ranks' schedulers in
lockstep (the same requests, batches and decisions), so anything of ours that decides
what a scheduler does must come out the same on every rank:

* admission takes the free pages of the fullest rank, and a compression whose pages do not
  fit on one rank is given up on all of them (:func:`tp_ops`'s ``min_over_ranks``,
  one all-reduce over the group's gloo (CPU) group per admission pass);
* policies that budget from every head's scores (Ada-KV), and D2O's merge threshold,
  all-gather the layer's scores (``gather``) inside the prefill forward, which every rank
  runs with the same rows;
* every compression step ends with a vote of the ranks (``min_over_ranks``, see
  ``kv/ranks.py``): a failure on one rank leaves the request whole on every rank, and no
  rank skips a collective the others wait in;
* with fewer KV heads than ranks (a head replicated on ``tp / H_kv`` ranks, each holding
  part of its query group) the replicas all-gather their scoring queries
  (``gather_queries``) and score with the whole group, so that they keep the same tokens;
* /server_info reports every rank's pool (``gather_objects`` in the internal-state hook).
"""

from __future__ import annotations

from typing import Any

import torch

from headkv_sglang.policies.sharding import HeadShard


def tp_shard() -> HeadShard:
    from sglang.srt.distributed import parallel_state

    if getattr(parallel_state, "_TP", None) is None:  # no model-parallel groups (offline kits)
        return HeadShard(1, 0)
    group = parallel_state.get_tp_group()
    return HeadShard(group.world_size, group.rank_in_group)


def tp_ops(shard: HeadShard, num_kv_heads: int, group: Any = None):
    """``(gather, min_over_ranks, gather_objects, gather_queries)`` over SGLang's
    tensor-parallel CPU group.

    ``gather_objects(x)``: every rank's ``x`` in rank order, for /server_info (SGLang hands
    every control request to all ranks of the group, so all of them call it alike).
    ``gather_queries(q)`` (None unless KV heads are replicated): ``[Hq_local, n, D]`` of every
    rank replicating this rank's KV head, concatenated in rank order: the head's whole query
    group. ``group``: another process group to use (tests: a gloo world of CPU processes)."""
    import torch.distributed as dist

    if group is None:
        from sglang.srt.distributed import parallel_state

        group = parallel_state.get_tp_group().cpu_group
    owners = shard.head_owners(num_kv_heads)  # fewer KV heads than ranks: one copy of each head

    def gather(scores: torch.Tensor) -> torch.Tensor:
        local = scores.detach().to("cpu", torch.float32).contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.tp_size)]
        dist.all_gather(parts, local, group=group)
        return torch.cat([parts[r] for r in owners]).to(scores.device)

    def min_over_ranks(value):
        """The minimum over the ranks of an int, or of each int of a tuple (one all-reduce)."""
        one = not isinstance(value, (tuple, list))
        t = torch.tensor([int(value)] if one else [int(v) for v in value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t[0]) if one else tuple(int(v) for v in t.tolist())

    def gather_objects(obj: Any) -> list:
        out: list = [None] * shard.tp_size
        dist.all_gather_object(out, obj, group=group)
        return out

    replicas = shard.replica_ranks(num_kv_heads)

    def gather_queries(q: torch.Tensor) -> torch.Tensor:
        local = q.detach().to("cpu", torch.float32).contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.tp_size)]
        dist.all_gather(parts, local, group=group)
        return torch.cat([parts[r] for r in replicas]).to(q.device, q.dtype)

    return gather, min_over_ranks, gather_objects, (gather_queries if len(replicas) > 1 else None)
