"""Tensor parallelism that cannot hang or diverge (issue 44), on CPU processes over gloo.

Every rank is a process running the serving layer's own collectives (``serving.parallel.
tp_ops``) over a gloo world. A failure injected on one rank, at any layer of the prefill
forward, in writing the pages, or in a decode move, must leave the request exactly as it
was on *every* rank (whole, no page held; or its record unchanged) without a hang: each
run is bounded by a timeout, and a clean request afterwards must still compress on all
ranks (no rank is left one collective behind). With fewer KV heads than ranks, the
replicas of a head must keep the same tokens as one rank holding the whole model.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import random
import socket

import pytest
import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.policies.sharding import HeadShard
from tp_ranks import run_rank

TIMEOUT = 240  # seconds for a whole world (spawn + import + scenario); a hang fails, it never blocks CI


def run_world(world: int, name: str, **args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, name, args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        for _ in range(world):
            rank, res = q.get(timeout=TIMEOUT)
            results[rank] = res
    except queue_mod.Empty:
        pytest.fail(f"{name}: ranks {sorted(set(range(world)) - set(results))} did not finish within {TIMEOUT} s "
                    f"(a hang); finished: {results}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r in range(world):
        assert not results[r].get("error"), f"rank {r}:\n{results[r]['error']}"
    return [results[r] for r in range(world)]


SHAPE = ModelShape(num_layers=3, num_q_heads=9, num_kv_heads=3, head_dim=8)  # the test model's heads
SNAP = dict(policy="snapkv", budget=9, window=4, kernel_size=3)
ADA = dict(policy="adakv", budget=9, window=4, kernel_size=3)  # gathers every layer's scores


def test_a_failure_on_one_rank_leaves_the_request_whole_on_every_rank(tmp_path):
    """Prefill: rank 1 fails at the first, a middle or the last layer, or writing its pages
    (after its pages were allocated): every rank ends WHOLE with no page held, rank 1 with
    its own error, the others with PeerFailed, all having cast the same votes; requests
    without a failure, in between, compress on every rank. Decode: a move failing on rank 1
    leaves every rank's record as it was and stops the moves on all of them."""
    from test_registry import POLICIES, write_profiles

    profile = write_profiles(tmp_path, SHAPE, random.Random(2))[POLICIES["d2o"].profile_method]
    d2o = dict(policy="d2o", budget=9, window=4, kernel_size=3, head_profile=profile)  # gathers for its merge
    cases = []
    for kw in (SNAP, ADA, d2o):
        cases += [(kw, 0), (kw, 2), (kw, "write"), (kw, None)]  # first layer, last layer, after agreement, none
    cases += [(SNAP, 1), (ADA, 1)]
    ranks = run_world(3, "failures", shape=SHAPE, cases=cases, decode_kw=dict(SNAP, decode_budget=6), fail_rank=1,
                      T=83, seed=3)
    for i, (kw, fail) in enumerate(cases):
        got = [r["cases"][i] for r in ranks]
        msg = f"case {i}: {kw['policy']} fail={fail}: {got}"
        assert len({g["votes"] for g in got}) == 1, msg  # every rank cast as many votes: none left behind
        if fail is None:
            assert all(g["phase"] == "compressed" and g["message"] == "ok" for g in got), msg
            continue
        assert all(g["phase"] == "whole" and g["used_pages"] == 0 for g in got), msg
        assert got[1]["outcome"] == "RuntimeError" and "injected" in got[1]["message"], msg
        assert all(g["outcome"] == "PeerFailed" for r, g in enumerate(got) if r != 1), msg

    dec = [r["decode"] for r in ranks]
    msg = str(dec)
    assert dec[1]["outcome"] == "RuntimeError", msg
    assert all(r["outcome"] == "PeerFailed" for i, r in enumerate(dec) if i != 1), msg
    assert all(r["same_record"] and r["tail_start"] == 61 and r["moved"] == [] and r["stopped"] for r in dec), msg
    assert len({r["votes"] for r in dec}) == 1, msg
    assert all(r["used"] == r["pages"] for r in dec), msg  # nothing allocated for the failed move


# 2 KV heads over 4 ranks: each head on 2 ranks, each with 2 of its 4 query heads
REPLICATED = ModelShape(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=8)


def one_rank(configs, T, seed, decode_steps=0):
    """The reference: one manager holding every head (the same inputs as tp_ranks)."""
    from test_registry import random_kv
    from tp_ranks import _rows

    shape = REPLICATED
    q, k, v = random_kv(shape, T + decode_steps + 1, seed)
    out = []
    for kw in configs:
        cfg = KVPolicyConfig(**kw).validate()
        m = CompressionManager(shape, 4000, 4, torch.float32, "cpu")
        m.begin_extend(0, "r", cfg.obs_window)
        for layer in range(shape.num_layers):
            m.capture_queries(layer, 0, q[layer][:T])
        m.compress(0, cfg, T, lambda layer: (k[layer][:T], v[layer][:T]))
        for seq in range(T + 1, T + 1 + decode_steps):
            for layer in range(shape.num_layers):
                m.capture_decode_query(layer, 0, q[layer][seq - 1])
            due = m.decode_due(0, seq)
            if due is not None:
                s, e = due
                m.compress_decode(0, s, e, lambda layer: (k[layer][s:e], v[layer][s:e]), shape.head_dim ** -0.5)
        out.append(_rows(m, m.records[0]))
    return out


def replica_rows_match(ranks, ref):
    """Per config: does every rank hold exactly the reference's rows of its head?"""
    same = []
    for i in range(len(ref)):
        ok = True
        for r in ranks:
            got = r["configs"][i]
            assert got["outcome"] == "ok", got
            lo, hi = got["heads"]
            for layer, (mine, want) in enumerate(zip(got["layers"], ref[i])):
                ok &= mine["lengths"] == want["lengths"][lo:hi]
                ok &= mine["k"] == want["k"][lo:hi] and mine["v"] == want["v"][lo:hi]
        same.append(ok)
    return same


def test_replicated_kv_heads_keep_the_same_tokens_on_every_replica():
    configs = [SNAP, dict(SNAP, scoring="window", window=7), ADA, dict(SNAP, decode_budget=5)]
    T, seed, steps = 97, 11, 40
    ref = one_rank(configs, T, seed, decode_steps=steps)
    # partial: the same without the query gather (each replica scores with half its group):
    # the replicas then differ from the reference, so the check can fail
    ranks = run_world(4, "replicated", shape=REPLICATED, configs=configs, T=T, seed=seed, decode_steps=steps,
                      partial_configs=configs[:1])
    assert all(r["configs"][3]["moves"] > 0 for r in ranks)  # the decode move ran (and scored)
    assert replica_rows_match([{"configs": r["configs"]} for r in ranks], ref) == [True] * len(configs)
    assert replica_rows_match([{"configs": r["partial"]} for r in ranks], ref[:1]) == [False]


def test_replicated_heads_without_the_query_gather_are_refused():
    with pytest.raises(ValueError, match=r"--tp 4 replicates each of the 2 KV heads on 2 ranks"):
        CompressionManager(REPLICATED, 100, 4, torch.float32, "cpu", shard=HeadShard(4, 1))
