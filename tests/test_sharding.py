"""Tensor parallelism (issue 20): a global plan split by rank equals the one-rank plan.

Each rank holds a contiguous block of KV heads (and their query heads). Compressing
every rank's heads with :class:`ShardedPolicy` (and, for Ada-KV, the layer's scores
gathered from all ranks) must keep exactly what one rank holding every head keeps, and
the managers of all ranks must take the same decisions (plan, not-smaller, admission
bound) without talking to each other. Random odd sizes, every registered policy.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_registry import POLICIES, random_kv, write_profiles

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager, NotSmallerError
from headkv_sglang.kv.pool import PoolFullError
from headkv_sglang.policies import compress_layer
from headkv_sglang.policies.registry import build_policy, pages_upper_bound
from headkv_sglang.policies.sharding import HeadShard, ShardedPolicy, rank_pages_bound

class ThreadGroup:
    """An all-gather among ``n`` threads (one per rank), as the TP group's would: every rank
    calls it in the same order, each gets every rank's tensor in rank order."""

    def __init__(self, n: int) -> None:
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n, timeout=60)

    def gather_for(self, rank: int, heads_of_rank):
        def gather(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            out = torch.cat([self.slots[r] for r in heads_of_rank])
            self.barrier.wait()
            return out
        return gather

    def min_for(self, rank: int):
        def min_over_ranks(x: int) -> int:
            self.slots[rank] = x
            self.barrier.wait()
            out = min(self.slots)
            self.barrier.wait()
            return out
        return min_over_ranks

    def run(self, fn):
        """``fn(rank)`` on every rank at once; the results in rank order."""
        with ThreadPoolExecutor(self.n) as ex:
            return list(ex.map(fn, range(self.n)))


SHAPES = [
    (ModelShape(num_layers=3, num_q_heads=9, num_kv_heads=3, head_dim=8), 3),   # the test model's heads, tp 3
    (ModelShape(num_layers=2, num_q_heads=12, num_kv_heads=6, head_dim=4), 2),  # 3 heads per rank
    (ModelShape(num_layers=2, num_q_heads=8, num_kv_heads=4, head_dim=4), 4),
]


def test_head_blocks_follow_sglang_split():
    assert [HeadShard(3, r).kv_heads(3) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [HeadShard(2, r).kv_heads(6) for r in range(2)] == [(0, 3), (3, 6)]
    assert [HeadShard(2, r).q_heads(18) for r in range(2)] == [(0, 9), (9, 18)]
    # fewer KV heads than ranks: SGLang replicates, tp / H ranks per head
    assert [HeadShard(4, r).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="not a multiple"):
        HeadShard(2, 0).kv_heads(3)
    with pytest.raises(ValueError, match="replicate"):
        HeadShard(3, 0).kv_heads(2)
    with pytest.raises(ValueError, match="tp_rank"):
        HeadShard(2, 2)
    # the all-gather's parts that make up every head once, in head order
    assert HeadShard(3, 0).head_owners(3) == [0, 1, 2]
    assert HeadShard(4, 2).head_owners(2) == [0, 2]


def config(tmp_path, name: str, shape: ModelShape, rng: random.Random, T: int) -> KVPolicyConfig:
    cls = POLICIES[name]
    budget = rng.randint(3, max(4, T // 3))
    kw = dict(window=rng.randint(1, min(budget, 9)), sink_size=min(3, budget - 1))
    if cls.profile_method is not None:
        kw["head_profile"] = write_profiles(tmp_path, shape, rng)[cls.profile_method]
    if name == "razor":
        kw["razor_fraction"] = rng.choice([0.15, 0.5])
    return KVPolicyConfig(policy=name, budget=budget, **kw).validate()


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_rank_keeps_the_one_rank_plans_rows(tmp_path, name):
    """compress_layer per rank == the rank's rows of compress_layer over all heads."""
    rng = random.Random(name)
    for trial, (shape, tp) in enumerate(SHAPES * 2):
        T = rng.choice([37, 101, 233])
        cfg = config(tmp_path, name, shape, rng, T)
        q, k, v = random_kv(shape, T, seed=trial)
        policy = build_policy(cfg, shape)
        L, H, Hq = shape.num_layers, shape.num_kv_heads, shape.num_q_heads
        planned = policy.plan_budgets(T, cfg.budget, L, H)
        w = min(cfg.obs_window, T)
        shards = HeadShard(tp, 0).all_ranks()
        prev_whole, prev_rank = None, [None] * tp  # the layer below's (PoD links layers)
        for layer in range(L):
            q_win = q[layer][T - w:].transpose(0, 1)
            kk, vv = k[layer].transpose(0, 1), v[layer].transpose(0, 1)
            whole = compress_layer(policy, layer, q_win, kk, vv, cfg.budget, planned, prev=prev_whole)
            prev_whole = whole

            def local(shard):
                lo, hi = shard.kv_heads(H)
                qlo, qhi = shard.q_heads(Hq)
                return q_win[qlo:qhi], kk[lo:hi], vv[lo:hi]

            group = ThreadGroup(tp)
            owners = HeadShard(tp, 0).head_owners(H)

            def rank(r):
                shard = shards[r]
                sp = ShardedPolicy(policy, shard, H, group.gather_for(r, owners))
                return compress_layer(sp, layer, *local(shard), cfg.budget, sp.plan_budgets(T, cfg.budget, L, H),
                                      prev=prev_rank[r])

            prev_rank = group.run(rank)
            for shard, mine in zip(shards, prev_rank):
                lo, hi = shard.kv_heads(H)
                rows = slice(int(whole.indptr[lo]), int(whole.indptr[hi]))
                msg = f"{name} trial {trial} layer {layer} rank {shard.tp_rank} T={T} B={cfg.budget}"
                assert torch.equal(mine.lengths, whole.lengths[lo:hi]), msg
                assert torch.equal(mine.indices, whole.indices[rows]), msg
                assert torch.equal(mine.k_flat, whole.k_flat[rows]), msg
                assert torch.equal(mine.v_flat, whole.v_flat[rows]), msg
                if whole.comp_k is not None:
                    assert torch.equal(mine.comp_k, whole.comp_k[lo:hi]), msg
                    assert torch.equal(mine.comp_count, whole.comp_count[lo:hi]), msg
                if whole.values_only is not None and bool(whole.values_only[rows].any()):
                    assert torch.equal(mine.values_only, whole.values_only[rows]), msg
                else:
                    assert mine.values_only is None, msg


def test_score_planned_policy_without_gather_refuses_to_guess(tmp_path):
    shape, tp = SHAPES[0]
    cfg = KVPolicyConfig(policy="adakv", budget=20, window=4).validate()
    policy = build_policy(cfg, shape)
    q, k, v = random_kv(shape, 90, seed=0)
    sp = ShardedPolicy(policy, HeadShard(tp, 1), shape.num_kv_heads)
    with pytest.raises(RuntimeError, match="needs gather"):
        compress_layer(sp, 0, q[0][-4:, 3:6].transpose(0, 1), k[0][:, 1:2].transpose(0, 1),
                       v[0][:, 1:2].transpose(0, 1), cfg.budget, None)


@pytest.mark.parametrize("name", list(POLICIES))
def test_rank_managers_agree_and_match_one_rank(tmp_path, name):
    """tp CompressionManagers: pages hold the one-rank manager's rows, each rank's pages stay
    within the (common) admission bound, and not-smaller is decided alike on every rank."""
    rng = random.Random("mgr" + name)
    page_size = rng.choice([1, 4, 16])
    for trial, (shape, tp) in enumerate(SHAPES):
        T = rng.choice([41, 157, 299])
        cfg = config(tmp_path, name, shape, rng, T)
        q, k, v = random_kv(shape, T, seed=100 + trial)
        H, Hq = shape.num_kv_heads, shape.num_q_heads

        def run(shard, gather=None):
            lo, hi = shard.kv_heads(H) if shard else (0, H)
            qlo, qhi = shard.q_heads(Hq) if shard else (0, Hq)
            m = CompressionManager(shape, 50000, page_size, torch.float32, "cpu", shard=shard, gather=gather)
            m.begin_extend(0, "r", cfg.obs_window)
            for layer in range(shape.num_layers):
                m.capture_queries(layer, 0, q[layer][:, qlo:qhi])
            try:
                return m, m.compress(0, cfg, T, lambda layer: (k[layer][:, lo:hi], v[layer][:, lo:hi]))
            except NotSmallerError:
                return m, None

        one, rec1 = run(None)
        shards = HeadShard(tp, 0).all_ranks()

        group = ThreadGroup(tp)
        owners = HeadShard(tp, 0).head_owners(H)
        results = group.run(lambda r: run(shards[r], group.gather_for(r, owners)))
        msg = f"{name} shape {shape} tp {tp} T={T} B={cfg.budget} ps={page_size}"
        compressed = {rec is not None for _, rec in results}
        assert len(compressed) == 1, msg  # every rank decides alike
        bounds = {m.pages_bound(cfg, T) for m, _ in results}
        assert len(bounds) == 1, msg  # admission's bound is the same number on every rank
        assert bounds.pop() <= pages_upper_bound(cfg, shape, T, page_size), msg
        if rec1 is None:
            # one rank refuses by its exact pages; the ranks by the global plan (exact for
            # planned policies) or Ada-KV's bound: they may only refuse more often
            assert compressed == {False} or name == "adakv", msg
            continue
        if name != "adakv":
            assert compressed == {True}, msg
        if compressed == {False}:
            continue
        for shard, (m, rec) in zip(shards, results):
            lo, hi = shard.kv_heads(H)
            assert len(rec.page_ids) <= m.pages_bound(cfg, T), msg
            for layer in range(shape.num_layers):
                mine, ref = rec.layers[layer], rec1.layers[layer]
                assert torch.equal(mine.lengths, ref.lengths[lo:hi]), msg
                ka, va, ma = m.pool.gather_padded(mine)
                kr, vr, mr = one.pool.gather_padded(ref)
                for h in range(hi - lo):
                    n = int(mine.lengths[h])
                    assert torch.equal(ka[h, :n], kr[lo + h, :n]) and torch.equal(va[h, :n], vr[lo + h, :n]), msg
                if ref.comp_k is not None:  # a mean over another memory layout: last-bit differences
                    assert torch.allclose(mine.comp_k, ref.comp_k[lo:hi], rtol=1e-5, atol=1e-6), msg
                    assert torch.equal(mine.comp_count, ref.comp_count[lo:hi]), msg
            m.free(0)
            m.check_integrity()
            assert m.allocator.free_pages == m.allocator.num_pages


def test_rank_bound_is_the_busiest_ranks_worst_case():
    """Every head keeps the whole prompt in the worst case of FullKV-like rows; the rank bound
    never exceeds the whole request's and never the rank's own rows x T."""
    shape, tp = SHAPES[1]
    cfg = KVPolicyConfig(policy="snapkv", budget=40).validate()
    policy = build_policy(cfg, shape)
    for T in (13, 40, 41, 500):
        for ps in (1, 16):
            b = rank_pages_bound(policy, T, 40, shape.num_layers, shape.num_kv_heads, ps, HeadShard(tp, 0))
            rows = shape.num_layers * shape.num_kv_heads // tp
            assert b == min(policy.max_pages(T, 40, shape.num_layers, shape.num_kv_heads, ps),
                            rows * -(-T // ps))
            assert b >= rows * -(-min(T, 40) // ps)  # snapkv: each of the rank's rows keeps min(T, B)


def test_a_full_pool_on_one_rank_leaves_the_request_whole_on_every_rank():
    """The ranks' schedulers stay in lockstep only if a request is compressed on all of them
    or on none: rank 1's pool cannot take it, so no rank allocates anything."""
    shape, tp = SHAPES[0]
    cfg = KVPolicyConfig(policy="snapkv", budget=24, window=4).validate()
    T = 120
    q, k, v = random_kv(shape, T, seed=5)
    group = ThreadGroup(tp)

    def rank(r):
        shard = HeadShard(tp, r)
        m = CompressionManager(shape, 3 if r == 1 else 5000, 8, torch.float32, "cpu", shard=shard,
                               gather=group.gather_for(r, [0, 1, 2]), min_over_ranks=group.min_for(r))
        m.begin_extend(0, "r", cfg.obs_window)
        for layer in range(shape.num_layers):
            m.capture_queries(layer, 0, q[layer][:, 3 * r:3 * r + 3])
        with pytest.raises(PoolFullError, match="" if r == 1 else "another tensor-parallel rank"):
            m.compress(0, cfg, T, lambda layer: (k[layer][:, r:r + 1], v[layer][:, r:r + 1]))
        return m.allocator.free_pages == m.allocator.num_pages and not m.records

    assert group.run(rank) == [True] * tp
