"""D2O against naive loop re-implementations on random odd sizes (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.policies import D2O, SnapKV, compress_layer, get_policy
from headkv_sglang.policies.d2o import merge_dropped
from headkv_sglang.policies.registry import build_policy


def density(num_layers: int, num_heads: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_layers, num_heads, generator=g, dtype=torch.float64) * 5


# --------------------------------------------------------------------------- naive references
def naive_layer_budgets(dens: torch.Tensor, seq_len: int, budget: int, window: int) -> list[float]:
    """D2O's allocation as the reference writes it, real-valued: L * (B - w) * softmax(-v)."""
    v = [sum(row) / len(row) for row in dens.tolist()]
    lo, hi = min(v), max(v)
    v = [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in v]
    e = [math.exp(-x) for x in v]
    w = min(window, budget, seq_len)
    return [len(v) * (budget - w) * x / sum(e) + w for x in e]


def naive_merge(k, v, keep, prev=None, ema=0.5, weighting="similarity"):
    """One (head, dropped token) at a time: best kept key by cosine, mean threshold (with
    ``prev``: its moving average ``ema * prev + (1 - ema) * mean``), then per kept token the
    paper's softmax weights (``e^1`` for itself, ``e^s`` for each source) or, with
    ``weighting="mean"``, the authors' code's ``(k_j + sum s k) / (1 + n)``."""
    H, T, D = k.shape
    kept = [[t for t in range(T) if keep[h, t]] for h in range(H)]
    cand = []  # (h, t, best similarity, kept token)
    for h in range(H):
        if not kept[h]:
            continue
        for t in range(T):
            if keep[h, t]:
                continue
            best, arg = -math.inf, None
            for j in kept[h]:
                a, b = k[h, t].double(), k[h, j].double()
                s = float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))
                if s > best + 1e-6:  # ties -> the earlier kept token
                    best, arg = s, j
            cand.append((h, t, best, arg))
    thr = sum(c[2] for c in cand) / len(cand) if cand else math.inf
    if prev is not None and cand:
        thr = ema * prev + (1 - ema) * thr
    ko, vo = [], []
    for h in range(H):
        for j in kept[h]:
            srcs = [(t, s) for (hh, t, s, a) in cand if hh == h and a == j and s >= thr - 1e-6]
            if weighting == "mean":
                w_self, ws, denom = 1.0, [s for _, s in srcs], 1.0 + len(srcs)
            else:
                w_self, ws = math.e, [math.exp(s) for _, s in srcs]
                denom = w_self + sum(ws)
            kk = w_self * k[h, j].double()
            vv = w_self * v[h, j].double()
            for (t, _), w in zip(srcs, ws):
                kk = kk + w * k[h, t].double()
                vv = vv + w * v[h, t].double()
            ko.append(kk / denom)
            vo.append(vv / denom)
    return torch.stack(ko), torch.stack(vo)


# --------------------------------------------------------------------------- layer level
@pytest.mark.parametrize("L, H, T, B, w", [(7, 3, 301, 37, 5), (5, 2, 97, 11, 3), (9, 1, 54, 50, 8), (3, 4, 13, 5, 5)])
def test_layer_budgets_follow_the_density_and_sum_to_the_budget(L, H, T, B, w):
    dens = density(L, H, seed=L * T)
    pol = D2O(density=dens, window_size=w, layers="profile")
    plan = pol.plan_budgets(T, B, L, H)
    assert plan.shape == (L, H) and plan.dtype == torch.int64
    assert int(plan.sum()) == L * H * min(B, T)
    assert (plan == plan[:, :1]).all()  # layer level: the heads of a layer share its budget
    assert (plan <= T).all() and (plan >= min(w, B)).all()
    ideal = naive_layer_budgets(dens, T, B, w)
    if max(ideal) <= T:  # no layer capped: the rounded plan is within one token of the formula
        assert max(abs(a - b) for a, b in zip(plan[:, 0].tolist(), ideal)) < 1.0
    # the densest layer (lowest variance) keeps the most, the sparsest the least
    order = dens.mean(1).argsort()
    assert plan[order[0], 0] >= plan[order[-1], 0]


def test_layer_budgets_capped_at_the_prompt_give_the_excess_to_the_others():
    dens = torch.tensor([[0.0], [0.0], [10.0]], dtype=torch.float64)
    plan = D2O(density=dens, window_size=2, layers="profile").plan_budgets(20, 16, 3, 1)
    assert plan[:, 0].tolist()[:2] == [20, 20] and int(plan.sum()) == 48


@pytest.mark.parametrize("L, H, T, B, w", [(7, 3, 301, 37, 5), (5, 2, 97, 11, 3)])
def test_uniform_layers_ignore_the_density_and_match_snapkv(L, H, T, B, w):
    pol = D2O(density=density(L, H, seed=T), window_size=w, layers="uniform")
    assert torch.equal(pol.plan_budgets(T, B, L, H), SnapKV(window_size=w).plan_budgets(T, B, L, H))
    with pytest.raises(ValueError, match="layers"):
        D2O(density=density(L, H), layers="dynamic")


def naive_request_budgets(dens, layer_scores, T, B, w):
    """``layers="request"`` one layer at a time, in plain Python: each layer's variance of its
    heads' normalised finite scores, the later ones predicted as ``c *`` the profile's, min-max
    normalised, ``exp(-v)``; this layer's share of what is left, the rest by the profile's shares."""
    L = len(layer_scores)
    prof = [sum(r) / len(r) for r in dens.tolist()]
    lo, hi = min(prof), max(prof)
    pn = [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in prof]
    pshare = [math.exp(-x) for x in pn]
    left = L * (B - w)
    seen, out = [], []
    for l, sc in enumerate(layer_scores):
        vs = []
        for row in sc.tolist():
            xs = [max(x, 0.0) for x, ok in zip(row, torch.isfinite(sc).all(0).tolist()) if ok]
            tot = sum(xs)
            ps = [x / tot for x in xs] if tot > 0 else [1 / len(xs)] * len(xs)
            m = sum(ps) / len(ps)
            vs.append(sum((x - m) ** 2 for x in ps) / len(ps))
        seen.append(sum(vs) / len(vs))
        c = sum(seen) / sum(prof[:l + 1])
        v = seen + [c * x for x in prof[l + 1:]]
        a, b = min(v), max(v)
        v = [(x - a) / (b - a) if b > a else 0.0 for x in v]
        e = [math.exp(-x) for x in v][l:]
        mine = min(round(left * e[0] / sum(e)), T - w, left)
        mine = max(mine, left - (L - l - 1) * (T - w))
        out.append(mine + w)
        left -= mine
    return out


@pytest.mark.parametrize("L, H, T, B, w, seed", [(7, 3, 301, 37, 5, 0), (5, 2, 97, 11, 3, 1), (6, 1, 40, 30, 4, 2)])
def test_request_layers_equal_the_naive_sequential_allocation(L, H, T, B, w, seed):
    g = torch.Generator().manual_seed(seed)
    dens = density(L, H, seed=seed)
    pol = D2O(density=dens, window_size=w, sink_size=2, layers="request")
    plan = pol.plan_budgets(T, B, L, H)
    total = int(plan.sum())
    layer_scores, got = [], []
    for layer in range(L):
        sc = torch.rand(H, T, generator=g) ** (1 + 6 * torch.rand(1, generator=g).item())  # sparser or denser
        sc[:, :2] = math.inf
        sc[:, T - w:] = math.inf
        layer_scores.append(sc)
        got.append(pol.layer_budgets(layer, T, B, sc, plan).tolist())
        assert len(set(got[-1])) == 1  # the heads of a layer share its budget
    assert int(plan.sum()) == total == L * H * B  # the request's total is unchanged
    assert [row[0] for row in got] == naive_request_budgets(dens, layer_scores, T, B, w)
    assert all(w <= row[0] <= T for row in got)
    assert not pol._seen  # the last layer forgets the request


def test_request_layers_follow_the_profile_when_the_request_is_alike_and_restart_at_layer_0():
    dens = torch.tensor([[1.0], [3.0], [2.0], [0.5]], dtype=torch.float64)
    T, B, w = 200, 40, 4
    prof = D2O(density=dens, window_size=w, layers="profile").plan_budgets(T, B, 4, 1)
    pol = D2O(density=dens, window_size=w, layers="request")
    for attempt in range(2):  # an abandoned request (attempt 0 stops after 2 layers) leaves nothing behind
        plan = pol.plan_budgets(T, B, 4, 1)
        for layer in range(4 if attempt else 2):
            # a head whose distribution's variance is proportional to the profile's
            sc = torch.zeros(1, T)
            sc[0, T - w:] = math.inf
            n = T - w
            var_target = float(dens[layer, 0]) * 1e-4
            # one position at a, the others alike: var(p) = (a - 1/n)^2 / (n - 1)
            a = 1 / n + math.sqrt(var_target * (n - 1))
            rest = (1 - a) / (n - 1)
            sc[0, :n] = rest
            sc[0, 0] = a
            pol.layer_budgets(layer, T, B, sc, plan)
        if attempt:
            assert (plan - prof).abs().max() <= 1 and int(plan.sum()) == int(prof.sum())


def test_budget_at_least_the_prompt_keeps_everything_and_equal_densities_are_uniform():
    pol = D2O(density=torch.ones(4, 2, dtype=torch.float64), window_size=4)
    assert (pol.plan_budgets(30, 30, 4, 2) == 30).all()
    assert (pol.plan_budgets(30, 12, 4, 2) == 12).all()


# --------------------------------------------------------------------------- token level
@pytest.mark.parametrize("weighting", ["similarity", "mean"])
@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_the_naive_loop_on_random_odd_sizes(seed, weighting):
    g = torch.Generator().manual_seed(seed)
    H, T, D = [(3, 37, 5), (2, 53, 7), (1, 19, 3), (4, 29, 9), (3, 41, 1), (2, 11, 4)][seed]
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    k[0, 3] = 0.0  # a zero key: cosine 0 with everything, no NaN
    keep = torch.rand(H, T, generator=g) < 0.3
    keep[0] = False  # a head that keeps nothing: its dropped tokens merge nowhere
    keep[-1, :] = seed % 2 == 0 or keep[-1, :]  # sometimes a head that keeps everything
    keep[:, T - 2:] = True if H > 1 else keep[:, T - 2:]
    head_of, pos = keep.nonzero(as_tuple=True)
    lengths = keep.sum(1)
    indptr = torch.zeros(H + 1, dtype=torch.int64)
    indptr[1:] = lengths.cumsum(0)
    got_k, got_v = merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr, weighting=weighting)
    want_k, want_v = naive_merge(k, v, keep, weighting=weighting)
    torch.testing.assert_close(got_k.double(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-5)
    assert got_k.dtype == k.dtype


def test_similarity_merge_is_a_convex_combination_and_equal_values_stay_equal():
    """The paper's weights sum to 1, so tokens that all carry the same value ``u`` merge into
    ``u``; the authors' code divides ``v_j + sum s_i v_i`` by the count and shrinks it to
    ``(1 + sum s_i) / (1 + n) u`` (what made merging lose every answer here)."""
    g = torch.Generator().manual_seed(3)
    H, T, D = 1, 41, 8
    base = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    perp = torch.randn(T, D, generator=g)
    perp = torch.nn.functional.normalize(perp - (perp @ base)[:, None] * base, dim=-1)
    k = (0.5 * base + (0.75 ** 0.5) * perp)[None]  # cosine 0.5 to base: equal similarities, all merge
    keep = torch.zeros(H, T, dtype=torch.bool)
    keep[0, 7] = True
    k[0, 7] = base
    u = torch.randn(D, generator=g)
    v = u.expand(H, T, D).clone()
    indptr = torch.tensor([0, 1])
    stats: dict = {}
    every = dict(prev_threshold=0.0, ema=1.0)  # threshold 0: every dropped token merges
    sim_k, sim_v = merge_dropped(k, v, keep, k[0, [7]], v[0, [7]], indptr, weighting="similarity", stats=stats,
                                 **every)
    _, mean_v = merge_dropped(k, v, keep, k[0, [7]], v[0, [7]], indptr, weighting="mean", **every)
    assert stats["merged"] == T - 1
    torch.testing.assert_close(sim_v[0], u)
    torch.testing.assert_close(mean_v[0], u * (1 + 0.5 * (T - 1)) / T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="weighting"):
        merge_dropped(k, v, keep, k[0, [7]], v[0, [7]], indptr, weighting="max")


def random_layer(seed: int, H: int, T: int, D: int, share: float):
    """Random ``k, v`` ``[H, T, D]``, a keep mask (about ``share`` of each head plus its last
    token) and the kept tokens' heads, positions and CSR indptr."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    keep = torch.rand(H, T, generator=g) < share
    keep[:, -1] = True
    head_of, pos = keep.nonzero(as_tuple=True)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    return k, v, keep, head_of, pos, indptr


@pytest.mark.parametrize("prev, ema", [(0.9, 0.5), (-0.2, 0.5), (0.4, 0.3), (0.0, 1.0)])
def test_merge_threshold_moving_average_equals_the_naive_loop(prev, ema):
    """Decode-time merging (D2O's ``alpha * threshold + belta * mean``): a high previous
    threshold merges fewer tokens, a low one more; ``stats`` reports the threshold used."""
    k, v, keep, head_of, pos, indptr = random_layer(int(100 * (prev + 1)), 3, 43, 5, 0.3)
    first, later = {}, {}
    merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr, stats=first)
    got_k, got_v = merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr, prev_threshold=prev,
                                 ema=ema, stats=later)
    want_k, want_v = naive_merge(k, v, keep, prev=prev, ema=ema)
    torch.testing.assert_close(got_k.double(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-5)
    assert later["threshold"] == pytest.approx(ema * prev + (1 - ema) * first["threshold"], abs=1e-6)
    if later["threshold"] > first["threshold"]:
        assert later["merged"] <= first["merged"]
    else:
        assert later["merged"] >= first["merged"]
    with pytest.raises(ValueError, match="ema"):
        merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr, prev_threshold=prev, ema=1.5)


def test_merge_chunks_give_the_same_result(monkeypatch):
    import headkv_sglang.policies.d2o as d2o

    k, v, keep, head_of, pos, indptr = random_layer(9, 3, 61, 6, 0.25)
    whole = merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr)
    monkeypatch.setattr(d2o, "_SIM_CHUNK", 7)  # one token per chunk
    chunked = merge_dropped(k, v, keep, k[head_of, pos], v[head_of, pos], indptr)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_merge_does_not_touch_the_inputs_and_merged_keys_move_towards_their_sources():
    # two kept keys; the dropped ones are near-copies of kept key 0, one unrelated key
    k = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0], [-1.0, 0.05]]])
    v = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    keep = torch.tensor([[True, False, False, True, False]])
    k0, v0 = k.clone(), v.clone()
    pol = D2O(density=torch.ones(1, 1, dtype=torch.float64), window_size=1, kernel_size=1, merge="on")
    kept = compress_layer(SnapKV(window_size=1), 0, torch.zeros(1, 1, 2), k, v, 2, torch.tensor([[2]]))
    kept.indices.copy_(torch.tensor([0, 3]))
    kept.k_flat, kept.v_flat = k[0, [0, 3]], v[0, [0, 3]]
    mk, mv = pol.merge_dropped(k, v, keep, kept)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    # token 4 (cosine ~ -1 to key 0, ~0.05 to key 3) is below the mean and is not merged
    s1 = float(torch.nn.functional.cosine_similarity(k[0, 1], k[0, 0], dim=0))
    s2 = float(torch.nn.functional.cosine_similarity(k[0, 2], k[0, 0], dim=0))
    e, e1, e2 = math.e, math.exp(s1), math.exp(s2)
    torch.testing.assert_close(mk[0], (e * k[0, 0] + e1 * k[0, 1] + e2 * k[0, 2]) / (e + e1 + e2))
    torch.testing.assert_close(mv[0], (e * v[0, 0] + e1 * v[0, 1] + e2 * v[0, 2]) / (e + e1 + e2))
    torch.testing.assert_close(mk[1], k[0, 3])


@pytest.mark.parametrize("T, B", [(77, 13), (40, 40), (9, 30)])
def test_compress_layer_keeps_sinks_window_and_top_tokens_and_merges(T, B):
    g = torch.Generator().manual_seed(T)
    L, H, Hq, D, w = 4, 3, 6, 8, 3
    dens = density(L, H, seed=5)
    q = torch.randn(Hq, w, D, generator=g)
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    on = D2O(density=dens, window_size=w, sink_size=4, merge="on", layers="profile")
    off = D2O(density=dens, window_size=w, sink_size=4, merge="off", layers="profile")
    plan = on.plan_budgets(T, B, L, H)
    for layer in range(L):
        a = compress_layer(on, layer, q, k, v, B, plan)
        b = compress_layer(off, layer, q, k, v, B, plan)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.indptr, b.indptr)  # merging keeps the choice
        assert a.lengths.tolist() == plan[layer].tolist()
        for h in range(H):
            kept = a.indices[a.indptr[h]:a.indptr[h + 1]].tolist()
            n = len(kept)
            assert kept[:min(4, n)] == list(range(min(4, n)))  # the sinks first
            assert kept[-min(w, n):] == list(range(T - min(w, n), T))  # the window
        # without merging the kept rows are the tokens themselves; with it they differ iff something merged
        torch.testing.assert_close(b.k_flat, k[torch.repeat_interleave(torch.arange(H), b.lengths), b.indices])
        if B < T:
            head_of = torch.repeat_interleave(torch.arange(H), a.lengths)
            want_k, _ = naive_merge(k, v, torch.zeros(H, T, dtype=torch.bool).index_put_(
                (head_of, a.indices), torch.tensor(True)))
            torch.testing.assert_close(a.k_flat.double(), want_k, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a.k_flat, b.k_flat)


@pytest.mark.parametrize("T, B, Hq, seed", [(97, 11, 6, 0), (301, 37, 9, 1), (53, 53, 3, 2)])
def test_defaults_keep_snapkvs_tokens_with_question_scoring(T, B, Hq, seed):
    """D2O's defaults (no sinks, uniform layers, no merge) keep SnapKV's tokens exactly, with the
    question as scoring queries (q_end before the window) and GQA groups of Hq / 3 query heads."""
    g = torch.Generator().manual_seed(seed)
    L, H, D, w, nq = 3, 3, 8, 5, 7
    q = torch.randn(Hq, nq, D, generator=g)
    k, v = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    d2o, snap = D2O(density=density(L, H, seed=seed), window_size=w), SnapKV(window_size=w)
    assert (d2o.sink_size, d2o.merge, d2o.layers) == (0, "off", "uniform")
    plan = d2o.plan_budgets(T, B, L, H)
    assert torch.equal(plan, snap.plan_budgets(T, B, L, H))
    for layer in range(L):
        a = compress_layer(d2o, layer, q, k, v, B, plan, q_end=T - w - 2)
        b = compress_layer(snap, layer, q, k, v, B, plan, q_end=T - w - 2)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.indptr, b.indptr)
        assert torch.equal(a.k_flat, b.k_flat) and torch.equal(a.v_flat, b.v_flat)
    # with the reference's 4 sinks the first tokens displace 4 - (SnapKV's picks among them) others
    four = D2O(density=density(L, H, seed=seed), window_size=w, sink_size=4)
    a = compress_layer(four, 0, q, k, v, B, plan, q_end=T - w - 2)
    b = compress_layer(snap, 0, q, k, v, B, plan, q_end=T - w - 2)
    for h in range(H):
        kept_a = set(a.indices[a.indptr[h]:a.indptr[h + 1]].tolist())
        kept_b = set(b.indices[b.indptr[h]:b.indptr[h + 1]].tolist())
        assert set(range(min(4, B))) <= kept_a and len(kept_a) == len(kept_b)
        assert len(kept_b - kept_a) == len(set(range(min(4, B))) - kept_b) or B >= T


def test_sink_scores_are_infinite_and_the_rest_are_snapkv():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 5, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    d = D2O(density=torch.ones(1, 2, dtype=torch.float64), window_size=5, sink_size=3).token_scores(q, k, 0)
    s = SnapKV(window_size=5).token_scores(q, k, 0)
    assert torch.isinf(d[:, :3]).all() and torch.equal(d[:, 3:], s[:, 3:])


# --------------------------------------------------------------------------- construction and config
def test_bad_fields_name_the_problem():
    with pytest.raises(ValueError, match="merge"):
        D2O(density=torch.ones(2, 2), merge="maybe")
    with pytest.raises(ValueError, match="density must be finite and >= 0"):
        D2O(density=torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="density must be a float"):
        D2O(density=torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="density"):
        D2O(density=torch.ones(2, 2, dtype=torch.float64)).plan_budgets(10, 5, 3, 2)
    with pytest.raises(ValueError, match="needs 'density'"):
        get_policy("d2o")


def test_server_config_builds_it_from_the_shipped_profile():
    from headkv_sglang.profiles import load_profile, shipped_profile

    smol = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, hidden_size=576)
    shape = ModelShape(30, 9, 3, 64, "LlamaForCausalLM", hf_config=smol)
    cfg = KVPolicyConfig(policy="d2o", budget=64, d2o_merge="off", d2o_sink_size=2, sink_size=5).validate()
    pol = build_policy(cfg, shape)
    prof = load_profile(shipped_profile(smol, "d2o"))
    assert isinstance(pol, D2O) and (pol.merge, pol.sink_size) == ("off", 2)
    assert torch.equal(pol.density, torch.as_tensor(prof.kv_scores, dtype=torch.float64))
    dflt = build_policy(KVPolicyConfig(policy="d2o", budget=64).validate(), shape)
    assert (dflt.merge, dflt.layers, dflt.sink_size) == ("off", "uniform", 0)  # measured: fidelity_d2o_sinks_cpu.md
    assert KVPolicyConfig(policy="d2o").with_request({"kv_d2o_merge": "on"}).d2o_merge == "on"
    cfg = KVPolicyConfig(policy="d2o").with_request({"kv_d2o_merge": "mean", "kv_d2o_layers": "uniform"})
    assert (build_policy(cfg.validate(), shape).merge, build_policy(cfg.validate(), shape).layers) == ("mean", "uniform")
    with pytest.raises(ConfigError, match=r"custom_params.kv_d2o_layers: invalid value 'x'; choose one of request, profile"):
        KVPolicyConfig(policy="d2o").with_request({"kv_d2o_layers": "x"})
    with pytest.raises(ConfigError, match=r"custom_params.kv_d2o_merge: invalid value 'no'; choose one of on, mean, off"):
        KVPolicyConfig(policy="d2o").with_request({"kv_d2o_merge": "no"})
    # D2O's sinks are its own setting: --kv-sink-size (StreamingLLM, Razor, PoD) does not touch them
    with pytest.raises(ConfigError, match=r"--kv-d2o-sink-size: invalid value 8; sinks must leave room"):
        KVPolicyConfig(policy="d2o", budget=8, d2o_sink_size=8).validate()
    KVPolicyConfig(policy="d2o", budget=8, sink_size=8).validate()
    with pytest.raises(ConfigError, match=r"custom_params.kv_d2o_sink_size: invalid value 8; sinks must leave room"):
        KVPolicyConfig(policy="d2o", budget=8).with_request({"kv_d2o_sink_size": 8}).validate()
    assert KVPolicyConfig(policy="d2o", budget_ratio=0.01, d2o_sink_size=4).for_prompt(100).budget == 5
    assert KVPolicyConfig(policy="d2o", budget_ratio=0.01, sink_size=4).for_prompt(100).budget == 1
    assert KVPolicyConfig(policy="pod", budget_ratio=0.01, sink_size=4).for_prompt(100).budget == 5
