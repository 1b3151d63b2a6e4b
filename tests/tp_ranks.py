"""Tensor-parallel ranks as CPU processes over gloo, for tests/test_tp_agreement.py.

Each process is one rank: it joins a gloo world, builds the serving layer's collectives
(``serving.parallel.tp_ops`` over that world) and a ``CompressionManager`` for its heads,
runs a scenario and puts ``(rank, result)`` on a queue. Not a test module: spawned
processes import it by name.
"""

from __future__ import annotations

import datetime
import traceback

import torch
from test_registry import random_kv  # per layer q, k, v (the ranks import this file from tests/)

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def run_rank(rank: int, world: int, port: int, name: str, args: dict, queue) -> None:
    import faulthandler
    import sys

    import torch.distributed as dist

    faulthandler.dump_traceback_later(args.pop("dump_after", 200), exit=True, file=sys.stderr)  # a hang says where
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        try:
            queue.put((rank, SCENARIOS[name](rank, world, **args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))


def _manager(rank, world, shape, pages=4000, page_size=4, query_gather=True):
    import torch.distributed as dist

    from headkv_sglang.kv.manager import CompressionManager
    from headkv_sglang.policies.sharding import HeadShard
    from headkv_sglang.serving.parallel import tp_ops

    shard = HeadShard(world, rank)
    gather, min_over_ranks, _, gather_queries = tp_ops(shard, shape.num_kv_heads, group=dist.group.WORLD)
    if not query_gather and gather_queries is not None:
        gather_queries = lambda q: q  # noqa: E731 - the mutation: each replica scores with its own queries only
    m = CompressionManager(shape, pages, page_size, torch.float32, "cpu", shard=shard, gather=gather,
                           min_over_ranks=min_over_ranks, gather_queries=gather_queries)
    return m, shard


def _prefill(m, shard, shape, row, cfg, T, q, k, v, fail_layer=None):
    """Capture, then the forward's per-layer hook (``get_kv`` raising at ``fail_layer``)."""
    lo, hi = shard.kv_heads(shape.num_kv_heads)
    qlo, qhi = shard.q_heads(shape.num_q_heads)
    m.begin_extend(row, f"r{row}", cfg.obs_window, compress_at=(cfg, T))
    m.reserve(row, m.pages_bound(cfg, T))
    for layer in range(shape.num_layers):
        m.capture_queries(layer, row, q[layer][:, qlo:qhi])
    for layer in range(shape.num_layers):
        def get_kv(i, layer=layer):
            assert i == layer, f"layer {layer}'s hook read layer {i}'s K/V"
            if layer == fail_layer:
                raise RuntimeError(f"injected failure at layer {layer}")
            return k[layer][:, lo:hi], v[layer][:, lo:hi]
        m.on_prefill_layer(layer, row, T, get_kv)
    m.release_reservation(row)
    return m.take_forward_outcome(row)


def _rows(m, rec):
    """Each layer's kept K and V rows (padded, as lists) and lengths."""
    out = []
    for lp in rec.layers:
        k, v, _ = m.pool.gather_padded(lp)
        n = lp.lengths.tolist()
        out.append({"lengths": n, "k": [k[h, :n[h]].tolist() for h in range(len(n))],
                    "v": [v[h, :n[h]].tolist() for h in range(len(n))]})
    return out


@scenario
def prefill_failure(rank, world, shape, cases, fail_rank, T, seed):
    """Each case: (policy config kwargs, fail: None | layer | "write"); then a clean request."""
    import headkv_sglang.kv.prefill as prefill
    from headkv_sglang.config import KVPolicyConfig

    m, shard = _manager(rank, world, shape)
    q, k, v = random_kv(shape, T, seed)
    results = []
    real_write = prefill.write_prompt_pages
    for i, (kw, fail) in enumerate(cases):
        cfg = KVPolicyConfig(**kw).validate()
        mine = fail if rank == fail_rank else None
        if mine == "write":
            def broken(*a, **kw):
                raise RuntimeError("injected write failure")
            prefill.write_prompt_pages = broken
        try:
            out = _prefill(m, shard, shape, i, cfg, T, q, k, v, fail_layer=mine if isinstance(mine, int) else None)
        finally:
            prefill.write_prompt_pages = real_write
        results.append({"phase": m.phase(i).value, "outcome": type(out).__name__, "message": str(out),
                        "used_pages": m.allocator.used_pages, "votes": m.vote.votes})
        m.release_row(i)
        m.check_integrity()
        assert m.allocator.used_pages == 0, m.allocator.used_pages
    return {"cases": results}


@scenario
def failures(rank, world, shape, cases, decode_kw, fail_rank, T, seed):
    """:func:`prefill_failure`'s cases, then :func:`decode_failure`, in one world."""
    return {**prefill_failure(rank, world, shape, cases, fail_rank, T, seed),
            "decode": decode_failure(rank, world, shape, decode_kw, fail_rank, T - 22, seed + 1)}


@scenario
def decode_failure(rank, world, shape, kw, fail_rank, T, seed):
    """A compressed request's decode move fails on ``fail_rank`` (no decode queries of layer 1
    captured there): every rank keeps its record as it was, and stops moving."""
    from headkv_sglang.config import KVPolicyConfig

    m, shard = _manager(rank, world, shape)
    cfg = KVPolicyConfig(**kw).validate()
    q, k, v = random_kv(shape, T + 64, seed)
    lo, hi = shard.kv_heads(shape.num_kv_heads)
    qlo, qhi = shard.q_heads(shape.num_q_heads)
    out = _prefill(m, shard, shape, 0, cfg, T, [x[:T] for x in q], k, v)
    assert out == "ok", out
    before = m.records[0]
    seq = T
    due = None
    while due is None:
        for layer in range(shape.num_layers):
            if not (rank == fail_rank and layer == 1):
                m.capture_decode_query(layer, 0, q[layer][seq, qlo:qhi])
        seq += 1
        due = m.decode_due(0, seq)
    err = None
    try:
        m.compress_decode(0, *due, lambda layer: (k[layer][due[0]:due[1], lo:hi], v[layer][due[0]:due[1], lo:hi]),
                          shape.head_dim ** -0.5)
    except Exception as e:
        err = e
        m.decode_failed(0, e)
    rec = m.records[0]
    return {"error": None, "outcome": type(err).__name__, "same_record": rec is before,
            "tail_start": rec.tail_start, "pages": len(rec.page_ids), "used": m.allocator.used_pages,
            "stopped": m.decode_due(0, seq + 10_000) is None, "moved": m.take_moved(), "votes": m.vote.votes}


@scenario
def replicated(rank, world, shape, configs, T, seed, decode_steps=0, partial_configs=()):
    """Compress one prompt per config; return every layer's kept rows (this rank's heads).
    ``partial_configs``: the same, by replicas that score with their own queries only."""
    return {"configs": _replicated(rank, world, shape, configs, T, seed, True, decode_steps),
            "partial": _replicated(rank, world, shape, partial_configs, T, seed, False, 0)}


def _replicated(rank, world, shape, configs, T, seed, query_gather, decode_steps):
    from headkv_sglang.config import KVPolicyConfig

    m, shard = _manager(rank, world, shape, query_gather=query_gather)
    q, k, v = random_kv(shape, T + decode_steps + 1, seed)
    lo, hi = shard.kv_heads(shape.num_kv_heads)
    qlo, qhi = shard.q_heads(shape.num_q_heads)
    out = []
    for i, kw in enumerate(configs):
        cfg = KVPolicyConfig(**kw).validate()
        res = _prefill(m, shard, shape, i, cfg, T, [x[:T] for x in q], k, v)
        if not isinstance(res, str):
            out.append({"outcome": repr(res)})
            continue
        moves = 0
        for seq in range(T + 1, T + 1 + decode_steps):
            for layer in range(shape.num_layers):
                m.capture_decode_query(layer, i, q[layer][seq - 1, qlo:qhi])
            due = m.decode_due(i, seq)
            if due is not None:
                s, e = due
                m.compress_decode(i, s, e, lambda layer, s=s, e=e: (k[layer][s:e, lo:hi], v[layer][s:e, lo:hi]),
                                  shape.head_dim ** -0.5)
                m.take_moved()
                moves += 1
        out.append({"outcome": "ok", "heads": [lo, hi], "moves": moves, "layers": _rows(m, m.records[i])})
        m.release_row(i)
    return out
