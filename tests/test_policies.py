"""Policies against naive loop re-implementations and by their invariants (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies import (
    POLICIES,
    AdaKV,
    FullKV,
    HeadKV,
    KVPolicy,
    PyramidKV,
    RazorAttention,
    SnapKV,
    StreamingLLM,
    compress_layer,
    get_policy,
    policy_names,
)
from headkv_sglang.reference import attend

L, H = 5, 3  # layers, KV heads of the planner tests


def make_policy(name: str, num_layers: int = L, num_heads: int = H, **kw) -> KVPolicy:
    """A policy of each kind with a fixed random profile where one is needed."""
    g = torch.Generator().manual_seed(1234)
    if name == "headkv":
        return HeadKV(importance=torch.rand(num_layers, num_heads, generator=g) ** 3, **kw)
    if name == "razor":
        mask = torch.rand(num_layers, num_heads, generator=g) < 0.3
        mask[0, 0] = True
        return RazorAttention(retrieval_heads=mask, **kw)
    return get_policy(name, **kw)


# --------------------------------------------------------------------------- #
# naive references
# --------------------------------------------------------------------------- #
def naive_scores(q_win, k, window_size, kernel_size, pooling, gqa_agg, q_end=None,
                 pool_shift=defaults.POOL_SHIFT):
    """SnapKV scoring with explicit loops: one query head, one scoring query at a time.

    The queries sit at positions ``[q_end - n, q_end)`` (default: the last ``n`` of the
    prompt); the last ``min(window_size, T)`` tokens are the kept window (``+inf``).
    Position ``s`` pools the prefix's mass at ``[s - r - shift, s + r - shift]``, ``r = kernel_size // 2``,
    ``shift = min(pool_shift, r)``.
    """
    hq, w, d = q_win.shape
    h, t, _ = k.shape
    g = hq // h
    q_end = t if q_end is None else q_end
    first = q_end - w  # position of the first scoring query
    prefix = t - min(window_size, t)
    out = torch.full((h, t), math.inf)
    for kv in range(h):
        pooled_heads = []
        for j in range(g):
            qh = kv * g + j
            mass = [0.0] * t
            for i in range(w):
                pos = first + i
                logits = [
                    float(q_win[qh, i].double() @ k[kv, s].double()) / math.sqrt(d) for s in range(pos + 1)
                ]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for s in range(pos + 1):
                    mass[s] += math.exp(logits[s] - m) / z
            r = kernel_size // 2
            pooled = []
            for s in range(prefix):
                lo = s - r - min(pool_shift, r)
                nb = [mass[u] for u in range(lo, lo + kernel_size) if 0 <= u < prefix]
                pooled.append(sum(nb) / kernel_size if pooling == "avgpool" else max(nb))
            pooled_heads.append(pooled)
        for s in range(prefix):
            vals = [p[s] for p in pooled_heads]
            out[kv, s] = sum(vals) / g if gqa_agg == "mean" else max(vals)
    return out


def naive_select(scores_row: list[float], b: int, w: int, t: int) -> list[int]:
    if b >= t:
        return list(range(t))
    n_win = min(w, b, t)
    prefix = t - min(w, t)
    ranked = sorted(range(prefix), key=lambda s: (-scores_row[s], s))
    return sorted(ranked[: b - n_win]) + list(range(t - n_win, t))


def naive_round(ideal: list[float], total: int) -> list[int]:
    base = [math.floor(x + 1e-9) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def naive_headkv(imp: torch.Tensor, beta: float, temp: float, t: int, b: int, w: int) -> torch.Tensor:
    """ReasonSnapKVCluster's formula in plain Python, clamp-and-refill by importance, one rounding."""
    n_l, n_h = imp.shape
    if b >= t:
        return torch.full((n_l, n_h), t, dtype=torch.int64)
    w = min(w, b, t)
    base = b - w
    vals = [float(x) for x in imp.flatten()]
    s = [x / sum(vals) for x in vals]
    s = [x**temp for x in s]
    s = [x / sum(s) for x in s]
    n = len(s)
    unit = int(base // beta)
    ideal = [(base - unit) + si * unit * n for si in s]
    alloc = list(ideal)
    cap = t - w
    while any(a > cap for a in alloc):
        excess = sum(a - cap for a in alloc if a > cap)
        alloc = [min(a, cap) for a in alloc]
        free = [i for i in range(n) if alloc[i] < cap]
        wsum = sum(s[i] for i in free)
        for i in free:
            alloc[i] += excess * (s[i] / wsum if wsum > 0 else 1 / len(free))
    final = naive_round(alloc, base * n)
    return torch.tensor([x + w for x in final], dtype=torch.int64).reshape(n_l, n_h)


def naive_pyramid(t: int, b: int, w: int, n_l: int, n_h: int, beta: float) -> torch.Tensor:
    """PyramidKVCluster's line with real-valued steps, rounded to an exact total."""
    if b >= t:
        return torch.full((n_l, n_h), t, dtype=torch.int64)
    w = min(w, b, t)
    base = b - w
    min_num = base // beta
    max_num = base * 2 - min_num
    if max_num >= t - w:
        max_num = t - w
        min_num = base * 2 - max_num
    if n_l == 1:
        line = [float(base)]
    else:
        line = [max_num - layer * (max_num - min_num) / (n_l - 1) for layer in range(n_l)]
    per_layer = naive_round(line, base * n_l)
    return torch.tensor([[x + w] * n_h for x in per_layer], dtype=torch.int64)


def naive_adakv(scores: torch.Tensor, b: int, w: int, alpha: float) -> tuple[list[int], list[list[int]]]:
    """Ada-KV with a Python global ranking of (score, head, position) triples."""
    n_h, t = scores.shape
    if b >= t or b <= w:
        kept = [naive_select(scores[h].tolist(), b, w, t) for h in range(n_h)]
        return [min(b, t)] * n_h, kept
    base, prefix = b - w, t - w
    floor = int(alpha * base)
    per_head = [sorted(range(prefix), key=lambda s, h=h: (-float(scores[h, s]), s)) for h in range(n_h)]
    chosen = [set(per_head[h][:floor]) for h in range(n_h)]
    pool = [
        (-float(scores[h, s]), h, r, s)
        for h in range(n_h)
        for r, s in enumerate(per_head[h])
        if r >= floor
    ]
    pool.sort()
    for _, h, _, s in pool[: n_h * (base - floor)]:
        chosen[h].add(s)
    kept = [sorted(chosen[h]) + list(range(t - w, t)) for h in range(n_h)]
    return [len(x) for x in kept], kept


# --------------------------------------------------------------------------- #
# registry and validation
# --------------------------------------------------------------------------- #
def test_registry_names_and_lookup():
    want = ["headkv", "snapkv", "pyramidkv", "adakv", "streamingllm", "razor", "d2o", "pod", "full"]
    assert policy_names() == sorted(want)
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert issubclass(cls, KVPolicy)
    assert get_policy("SnapKV", window_size=16) == SnapKV(window_size=16)
    assert get_policy("pyramidkv", beta=10).beta == 10
    assert RazorAttention.uses_compensation and not SnapKV.uses_compensation


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown KV policy 'h2o'.*adakv.*streamingllm"):
        get_policy("h2o")
    allowed = r"allowed: \['agnostic_kernel_size', 'gqa_agg', 'kernel_size', 'pool_shift', 'pooling', 'window_size'\]"
    with pytest.raises(ValueError, match=r"no hyperparameter 'floor_alpha'.*" + allowed):
        get_policy("snapkv", floor_alpha=0.2)
    with pytest.raises(ValueError, match=r"needs 'importance'"):
        get_policy("headkv")
    with pytest.raises(ValueError, match=r"needs 'retrieval_heads'"):
        get_policy("razor")


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("snapkv", "window_size", 0),
        ("snapkv", "kernel_size", 4),
        ("snapkv", "kernel_size", True),
        ("snapkv", "pooling", "sumpool"),
        ("snapkv", "gqa_agg", "median"),
        ("snapkv", "pool_shift", -1),
        ("headkv", "pool_shift", 1.5),
        ("pyramidkv", "beta", 0.5),
        ("adakv", "floor_alpha", 1.5),
        ("adakv", "floor_alpha", float("nan")),
        ("streamingllm", "sink_size", -1),
        ("headkv", "beta", 0.9),
        ("headkv", "temp", 0.0),
        ("razor", "sink_size", -2),
    ],
)
def test_invalid_hyperparameters_raise_value_error(name, field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}" if not isinstance(value, float) else field):
        make_policy(name, **{field: value})


def test_profile_validation():
    with pytest.raises(ValueError, match="importance.*shape"):
        HeadKV(importance=torch.rand(5))
    with pytest.raises(ValueError, match="importance.*>= 0"):
        HeadKV(importance=-torch.rand(2, 2))
    with pytest.raises(ValueError, match="retrieval_heads.*bool"):
        RazorAttention(retrieval_heads=torch.ones(2, 2))
    pol = HeadKV(importance=torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"importance has shape \[4, 2\].*num_layers=5, num_kv_heads=2"):
        pol.plan_budgets(100, 10, 5, 2)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        pol.plan_budgets(100, 0, 4, 2)
    pol.check_model(4, 2)
    with pytest.raises(ValueError, match=r"importance has shape \[4, 2\].*num_kv_heads=3"):
        pol.check_model(4, 3)
    razor = RazorAttention(retrieval_heads=torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"retrieval_heads has shape \[4, 2\].*num_layers=30"):
        razor.check_model(30, 2)
    SnapKV().check_model(30, 3)


def test_profile_is_copied_and_frozen():
    imp = torch.rand(3, 2)
    pol = HeadKV(importance=imp)
    before = pol.plan_budgets(200, 40, 3, 2)
    imp[0, 0] = 1000.0
    assert torch.equal(pol.plan_budgets(200, 40, 3, 2), before)
    with pytest.raises(AttributeError):
        pol.beta = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len", [1, 5, 54, 97])
@pytest.mark.parametrize("head_dim, group", [(7, 1), (64, 3), (7, 4)])
@pytest.mark.parametrize("pooling, gqa_agg", [("maxpool", "mean"), ("avgpool", "max")])
def test_scores_match_naive_loops(seq_len, head_dim, group, pooling, gqa_agg):
    torch.manual_seed(seq_len * 100 + head_dim + group)
    n_kv, window = 2, 6
    w = min(window, seq_len)
    q_win = torch.randn(n_kv * group, w, head_dim) * 2
    k = torch.randn(n_kv, seq_len, head_dim) * 2
    pol = SnapKV(window_size=window, kernel_size=5, pooling=pooling, gqa_agg=gqa_agg)
    got = pol.token_scores(q_win, k, layer=0)
    want = naive_scores(q_win, k, window, 5, pooling, gqa_agg)
    assert got.dtype == torch.float32 and got.shape == (n_kv, seq_len)
    assert torch.isinf(got[:, seq_len - w :]).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq_len, n, q_end, window", [
    (54, 7, 49, 5),    # a question ending before a 5-token template tail, window 5
    (54, 7, 49, 2),    # a kept window shorter than the tail: keys between them score 0
    (97, 13, 97, 3),   # more scoring queries than kept tokens, ending at the prompt's end
    (33, 1, 1, 4),     # one query at position 0
    (61, 30, 40, 25),  # the window overlaps the question
    (9, 9, 9, 9),      # everything is the window
])
@pytest.mark.parametrize("head_dim, group", [(7, 1), (5, 3)])
def test_question_scores_match_naive_loops(seq_len, n, q_end, window, head_dim, group):
    """Question-aware scoring: queries at positions [q_end - n, q_end), the window kept apart."""
    torch.manual_seed(seq_len + n + q_end + window + head_dim)
    n_kv = 2
    q = torch.randn(n_kv * group, n, head_dim) * 2
    k = torch.randn(n_kv, seq_len, head_dim) * 2
    pol = SnapKV(window_size=window, kernel_size=3, pooling="maxpool", gqa_agg="mean")
    got = pol.token_scores(q, k, 0, q_end=q_end)
    want = naive_scores(q, k, window, 3, "maxpool", "mean", q_end=q_end)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[:, seq_len - min(window, seq_len):]).all()
    # without q_end, the last-n queries score as SnapKV's window does when n == window
    if q_end == seq_len and n == min(window, seq_len):
        torch.testing.assert_close(pol.token_scores(q, k, 0), got)


@pytest.mark.parametrize("seq_len, kernel_size, shift", [(54, 5, 0), (54, 5, 2), (97, 13, 6), (23, 7, 3),
                                                       (8, 3, 5), (40, 1, 2), (61, 9, 3)])
@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
def test_shifted_pooling_matches_naive_loops(seq_len, kernel_size, shift, pooling):
    """``pool_shift`` moves each position's pooling window to the past (at most to a window ending at the
    position: (8, 3, 5) and (40, 1, 2) are clamped), scored by a question or by the window."""
    torch.manual_seed(seq_len * 7 + kernel_size + shift)
    n_kv, group, head_dim, window = 2, 3, 9, 4
    q = torch.randn(n_kv * group, 5, head_dim) * 2
    k = torch.randn(n_kv, seq_len, head_dim) * 2
    pol = SnapKV(window_size=window, kernel_size=kernel_size, pooling=pooling, pool_shift=shift)
    for q_end in (seq_len - 2, None):
        got = pol.token_scores(q, k, 0, q_end=q_end) if q_end else pol.token_scores(q[:, :window], k, 0)
        want = naive_scores(q if q_end else q[:, :window], k, window, kernel_size, pooling, "mean",
                            q_end=q_end, pool_shift=shift)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shifted_pooling_keeps_the_tokens_after_a_peak():
    """One attended key at position 10: centred pooling spreads its score over 7..13, a shift
    of 3 over 10..16 (the key and the six tokens after it)."""
    seq_len, head_dim, window = 40, 8, 4
    k = torch.zeros(1, seq_len, head_dim)
    k[0, 10, 0] = 30.0
    q = torch.zeros(1, 2, head_dim)
    q[0, :, 0] = 1.0
    for shift, want in ((0, range(7, 14)), (3, range(10, 17))):
        scores = SnapKV(window_size=window, kernel_size=7, pool_shift=shift).token_scores(q, k, 0, q_end=seq_len)
        top = scores[0, : seq_len - window]
        assert (top > 0.5).nonzero().flatten().tolist() == list(want)


def test_question_scores_reject_a_span_outside_the_prompt():
    k = torch.randn(2, 20, 8)
    pol = SnapKV(window_size=4)
    for q, q_end in ((torch.randn(2, 5, 8), 21), (torch.randn(2, 5, 8), 4), (torch.randn(2, 0, 8), 10),
                     (torch.randn(2, 5, 8), True)):
        with pytest.raises(ValueError, match="q_end"):
            pol.token_scores(q, k, 0, q_end=q_end)


def test_scores_accept_bf16_and_reject_bad_shapes():
    torch.manual_seed(0)
    q = torch.randn(6, 4, 16)
    k = torch.randn(2, 33, 16)
    pol = SnapKV(window_size=4)
    ref = pol.token_scores(q, k, 0)
    low = pol.token_scores(q.bfloat16(), k.bfloat16(), 0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.1, atol=0.05)
    with pytest.raises(ValueError, match=r"num_q_heads \(5\) must be a multiple of num_kv_heads \(2\)"):
        pol.token_scores(torch.randn(5, 4, 16), k, 0)
    with pytest.raises(ValueError, match="expected the last min"):
        pol.token_scores(torch.randn(6, 3, 16), k, 0)


def test_scores_prefer_attended_tokens():
    """A key aligned with every window query must outrank the rest."""
    torch.manual_seed(1)
    k = torch.randn(1, 40, 8) * 0.1
    q = torch.randn(2, 4, 8) * 0.1
    direction = torch.randn(8)
    k[0, 11] = direction * 5
    q[:, :] += direction
    scores = SnapKV(window_size=4, kernel_size=1).token_scores(q, k, 0)
    assert int(scores[0, :36].argmax()) == 11


# --------------------------------------------------------------------------- #
# selection
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len", [1, 5, 54, 301])
@pytest.mark.parametrize("window", [1, 8])
def test_select_is_window_plus_top_scored(seq_len, window):
    torch.manual_seed(seq_len + window)
    n_h = 4
    # Few distinct values: plenty of ties, which must go to the lower position.
    scores = torch.randint(0, 5, (n_h, seq_len)).float()
    scores[:, seq_len - min(window, seq_len) :] = math.inf
    budgets = torch.tensor([0, 3, seq_len // 2 + 1, seq_len + 7])
    kept = SnapKV(window_size=window).select(scores, budgets)
    for h in range(n_h):
        idx = kept[h]
        b = min(int(budgets[h]), seq_len)
        assert idx.dtype == torch.int64 and idx.numel() == b
        assert torch.equal(idx, torch.unique(idx)), "sorted and unique"
        assert idx.tolist() == naive_select(scores[h].tolist(), int(budgets[h]), window, seq_len)


def test_select_keeps_last_tokens_when_budget_below_window():
    scores = torch.arange(20.0)[None].repeat(2, 1)
    kept = SnapKV(window_size=8).select(scores, torch.tensor([5, 8]))
    assert kept[0].tolist() == list(range(15, 20))
    assert kept[1].tolist() == list(range(12, 20))


# --------------------------------------------------------------------------- #
# planners: properties for every policy
# --------------------------------------------------------------------------- #
BOUNDED = ["snapkv", "pyramidkv", "headkv", "streamingllm"]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "headkv", "streamingllm", "razor", "full"])
@pytest.mark.parametrize(
    "seq_len, budget",
    [(1, 1), (5, 3), (54, 20), (97, 64), (301, 40), (301, 301), (54, 500), (97, 8), (97, 4)],
)
def test_planner_properties(name, seq_len, budget):
    pol = make_policy(name)
    plan = pol.plan_budgets(seq_len, budget, L, H)
    assert plan.dtype == torch.int64 and plan.shape == (L, H)
    assert (plan >= 0).all() and (plan <= seq_len).all(), plan
    assert (plan >= min(pol.window_size, budget, seq_len)).all(), plan
    assert torch.equal(plan, pol.plan_budgets(seq_len, budget, L, H)), "deterministic"
    total = int(plan.sum())
    if name in BOUNDED:
        assert total == L * H * min(budget, seq_len), (total, plan)
    elif name == "full":
        assert (plan == seq_len).all()
    else:  # razor: retrieval heads keep all, others min(B, T)
        want = torch.where(pol.retrieval_heads, seq_len, min(budget, seq_len))
        assert torch.equal(plan, want)
        assert total >= L * H * min(budget, seq_len)


@pytest.mark.parametrize("name", BOUNDED + ["razor"])
def test_planner_total_monotone_in_budget(name):
    pol = make_policy(name)
    totals = [int(pol.plan_budgets(211, b, L, H).sum()) for b in range(1, 260, 7)]
    assert totals == sorted(totals)
    assert totals[-1] == L * H * 211 or name == "razor"


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "razor", "full"])
def test_uniform_planners_are_monotone_per_head(name):
    pol = make_policy(name)
    prev = None
    for b in range(1, 120, 5):
        plan = pol.plan_budgets(97, b, L, H)
        if prev is not None:
            assert (plan >= prev).all()
        prev = plan


# --------------------------------------------------------------------------- #
# HeadKV
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len, budget", [(54, 20), (97, 64), (301, 40), (40, 30), (12, 11), (5, 3)])
@pytest.mark.parametrize("beta, temp", [(1.005, 1.0), (1.5, 1.0), (10.0, 2.0)])
def test_headkv_matches_naive(seq_len, budget, beta, temp):
    torch.manual_seed(seq_len + budget)
    imp = torch.rand(L, H) ** 4
    pol = HeadKV(importance=imp, beta=beta, temp=temp, window_size=4)
    got = pol.plan_budgets(seq_len, budget, L, H)
    want = naive_headkv(imp.double(), beta, temp, seq_len, budget, 4)
    assert torch.equal(got, want), (got, want)


def test_headkv_is_the_reference_formula_when_nothing_clamps():
    """Within one token of ReasonSnapKVCluster's round(s * pool + min_num), same shares."""
    torch.manual_seed(7)
    imp = torch.rand(L, H) + 0.1
    b, w, t = 72, 8, 10_000
    pol = HeadKV(importance=imp, beta=1.01, window_size=w)
    got = pol.plan_budgets(t, b, L, H)
    base = b - w
    s = imp.double() / imp.double().sum()
    reference = torch.round(s * (base // 1.01) * L * H + (base - base // 1.01)).long() + w
    assert (got - reference).abs().max() <= 1
    assert int(got.sum()) == L * H * b
    # more important heads never get less
    order = torch.argsort(imp.flatten())
    assert (got.flatten()[order].diff() >= -1).all()


@pytest.mark.parametrize("floor, beta", [(0.5, 2.0), (0.75, 1.0), (0.25, 1.5)])
def test_headkv_beta_is_a_floor_on_the_profile(floor, beta):
    """Mixing ``floor`` of the uniform split into the shares plans as ``beta / (1 - floor)``
    (both pools whole tokens here: base 96 -> base // beta and base // (beta / (1 - floor)))."""
    torch.manual_seed(int(floor * 100))
    imp = torch.rand(L, H) ** 6
    imp[0, :2] = 0.0  # a sparse profile, as r2's
    s = imp.double() / imp.double().sum()
    mixed = HeadKV(importance=(1 - floor) * s + floor / (L * H), beta=beta, window_size=8)
    raised = HeadKV(importance=imp, beta=beta / (1 - floor), window_size=8)
    a, b = (p.plan_budgets(10_000, 104, L, H) for p in (mixed, raised))
    assert int(a.sum()) == int(b.sum()) == L * H * 104
    assert (a - b).abs().max() <= 1, (a, b)
    unit = 96 // beta  # zero-score heads: window + base - unit + their floor share of the pool
    assert (a[0, :2] - (8 + 96 - unit + floor * unit)).abs().max() <= 1, a[0, :2]


def test_headkv_redistributes_clamped_excess():
    imp = torch.full((L, H), 0.01)
    imp[1, 2] = 10.0
    imp[3, 0] = 5.0
    t, b, w = 60, 30, 8
    pol = HeadKV(importance=imp, beta=1.005, window_size=w)
    plan = pol.plan_budgets(t, b, L, H)
    assert plan[1, 2] == t and plan[3, 0] == t
    assert int(plan.sum()) == L * H * b
    # HeadKV's own code clamps the two big heads to T and loses the rest.
    base = b - w
    s = imp.double() / imp.double().sum()
    theirs = torch.clamp(torch.round(s * (base // 1.005) * L * H + base - base // 1.005).long() + w, max=t)
    assert int(theirs.sum()) < L * H * b
    others = plan.flatten()[[i for i in range(L * H) if i not in (1 * H + 2, 3 * H + 0)]]
    assert (others > w).all() and others.max() - others.min() <= 1


def test_headkv_from_query_head_profile_averages_groups():
    q_profile = torch.tensor([[1.0, 3.0, 0.0, 2.0, 2.0, 2.0]])
    pol = HeadKV.from_profile(q_profile, num_kv_heads=2, beta=2.0)
    torch.testing.assert_close(pol.importance, torch.tensor([[4 / 3, 2.0]], dtype=torch.float64))
    assert HeadKV.from_profile(torch.ones(2, 3)).importance.shape == (2, 3)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads=4"):
        HeadKV.from_profile(q_profile, num_kv_heads=4)


# --------------------------------------------------------------------------- #
# PyramidKV
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n_layers", [1, 2, 5, 30])
@pytest.mark.parametrize("seq_len, budget", [(54, 20), (97, 64), (301, 40), (301, 200), (5, 3), (2000, 128)])
@pytest.mark.parametrize("beta", [20, 3])
def test_pyramidkv_matches_naive(n_layers, seq_len, budget, beta):
    pol = PyramidKV(beta=beta, window_size=8)
    got = pol.plan_budgets(seq_len, budget, n_layers, H)
    want = naive_pyramid(seq_len, budget, 8, n_layers, H, beta)
    assert torch.equal(got, want), (got[:, 0], want[:, 0])
    assert int(got.sum()) == n_layers * H * min(budget, seq_len)
    assert (got[:, 0].diff() <= 0).all(), "budgets shrink with depth"
    assert (got == got[:, :1]).all(), "one budget per layer"


def test_pyramidkv_shape_is_pyramidal():
    plan = PyramidKV(beta=20, window_size=8).plan_budgets(4000, 136, 32, 8)[:, 0]
    base = 128
    assert plan[0] - 8 == 2 * base - base // 20 and plan[-1] - 8 == base // 20
    assert plan[0] > plan[-1]


# --------------------------------------------------------------------------- #
# AdaKV
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len, budget", [(54, 20), (97, 64), (301, 40), (8, 5), (20, 20), (300, 9)])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("group", [1, 4])
def test_adakv_matches_naive_global_topk(seq_len, budget, alpha, group):
    torch.manual_seed(seq_len * 7 + budget)
    n_h, w, d = 3, 8, 16
    pol = AdaKV(floor_alpha=alpha, window_size=w, kernel_size=3)
    q = torch.randn(n_h * group, min(w, seq_len), d) * 3
    k = torch.randn(n_h, seq_len, d) * 3
    assert pol.plan_budgets(seq_len, budget, L, n_h) is None
    scores = pol.token_scores(q, k, 0)
    budgets = pol.layer_budgets(0, seq_len, budget, scores, None)
    want_budgets, want_kept = naive_adakv(scores, budget, w, alpha)
    assert budgets.dtype == torch.int64 and budgets.tolist() == want_budgets
    kept = pol.select(scores, budgets)
    assert [x.tolist() for x in kept] == want_kept
    assert int(budgets.sum()) == n_h * min(budget, seq_len)
    if budget < seq_len and budget > w:
        assert (budgets >= w + int(alpha * (budget - w))).all()


def test_adakv_moves_budget_to_concentrated_heads():
    """A head whose mass is spread thin loses budget to a head with several sharp peaks."""
    t, b, w = 200, 40, 8
    scores = torch.full((2, t), 1e-3)
    scores[0, :192] = 1.0 / 192  # flat
    scores[1, torch.arange(0, 192, 3)] = 0.5  # 64 peaks: more than it can win
    scores[:, t - w :] = math.inf
    budgets = AdaKV(floor_alpha=0.2, window_size=w).layer_budgets(0, t, b, scores, None)
    floor = int(0.2 * (b - w))
    assert budgets.tolist() == [w + floor, 2 * b - w - floor]


# --------------------------------------------------------------------------- #
# StreamingLLM and RazorAttention
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seq_len, budget", [(97, 20), (54, 54), (30, 9), (5, 3)])
def test_streamingllm_keeps_sinks_and_recent(seq_len, budget):
    pol = StreamingLLM(sink_size=4, window_size=4)
    k = torch.randn(2, seq_len, 7)
    scores = pol.token_scores(torch.zeros(0), k, 0)
    kept = pol.select(scores, pol.plan_budgets(seq_len, budget, 1, 2)[0])
    b = min(budget, seq_len)
    if b >= seq_len:
        want = list(range(seq_len))
    elif b >= 4 + 4:
        want = list(range(4)) + list(range(seq_len - (b - 4), seq_len))
    else:
        want = sorted(list(range(b - min(4, b))) + list(range(seq_len - min(4, b), seq_len)))
    assert kept[0].tolist() == want and kept[1].tolist() == want


def test_razor_from_scores_picks_top_heads():
    echo = torch.zeros(10, 10)
    induction = torch.zeros(10, 10)
    echo[2, 3] = 9.0
    induction.view(-1)[torch.arange(50, 64)] = torch.arange(1.0, 15.0)
    induction[2, 3] = 0.5
    pol = RazorAttention.from_scores(echo, induction, echo_fraction=0.01, induction_fraction=0.14)
    want = torch.zeros(100, dtype=torch.bool)
    want[50:64] = True
    want[23] = True
    assert torch.equal(pol.retrieval_heads.flatten(), want)
    small = RazorAttention.from_scores(
        torch.rand(2, 3), torch.rand(2, 3), echo_fraction=0.0, induction_fraction=0.01
    )
    assert int(small.retrieval_heads.sum()) == 1


def naive_ranking(echo, induction, echo_fraction):
    n = echo.numel()
    e = echo.flatten().tolist()
    ind = induction.flatten().tolist()
    top = math.ceil(echo_fraction * n - 1e-9)
    first = sorted(range(n), key=lambda i: (-e[i], i))[:top]
    rest = [i for i in sorted(range(n), key=lambda i: (-ind[i], i)) if i not in first]
    return first + rest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("seq_len, budget", [(997, 10), (997, 20), (997, 50), (301, 150), (61, 7), (40, 40),
                                             (2000, 1999)])
def test_budget_matched_razor_holds_at_most_the_budget_with_the_most_retrieval_heads(seed, seq_len, budget):
    """--kv-razor-heads budget: R = the most heads (in ranking order) the budget pays for; the
    KV held, compensation states included, is <= L*H*B; R+1 heads would not fit."""
    g = torch.Generator().manual_seed(seed)
    n_l, n_h, sinks = 5, 3, 4
    echo, induction = torch.rand(n_l, n_h, generator=g), torch.rand(n_l, n_h, generator=g)
    order = RazorAttention.ranking(echo, induction, echo_fraction=0.07)
    assert order.tolist() == naive_ranking(echo, induction, 0.07)
    pol = RazorAttention(retrieval_heads=torch.zeros(n_l, n_h, dtype=torch.bool), sink_size=sinks,
                         window_size=4, head_order=order)
    planned = pol.plan_budgets(seq_len, budget, n_l, n_h)
    n = n_l * n_h
    full = planned.flatten() == seq_len
    r = int(full.sum()) if budget < seq_len else n
    assert set(order[:r].tolist()) == set(torch.nonzero(full).flatten().tolist()) or r == n
    others = planned.flatten()[~full]
    held = int(planned.sum()) + int((others < seq_len).sum())  # + one compensation state each
    m = sinks + 1
    if budget >= m + 1:
        assert held <= n * budget, (held, n * budget)
    assert (others >= min(m, seq_len)).all()
    if r < n:  # maximal: one more retrieval head (others at their minimum) would not fit
        assert (r + 1) * seq_len + (n - r - 1) * (m + 1) > n * budget
        # and the others use what is left, up to one token each
        assert held > n * budget - (n - r) - seq_len or budget < m + 1


def test_razor_from_config_ranks_kv_heads_by_their_strongest_query_head():
    """A KV head with one strong retrieval query head is a retrieval head (group max, not mean)."""
    from headkv_sglang.config import KVPolicyConfig, ModelShape
    from headkv_sglang.profiles import HeadProfile

    n_l, hq, hkv = 10, 4, 2  # groups of 2: 20 KV heads
    echo = [[0.0] * hq for _ in range(n_l)]
    induction = [[0.1] * hq for _ in range(n_l)]
    echo[9][3] = 1.0         # KV head (9, 1) = 19: the echo head
    induction[3][0] = 1.0    # KV head (3, 0): one strong query head, group mean 0.55
    induction[5][2] = 0.6    # KV head (5, 1): both query heads fairly strong, mean 0.6
    induction[5][3] = 0.6
    prof = HeadProfile(architecture="LlamaForCausalLM", model_name="toy", num_layers=n_l, num_q_heads=hq,
                       num_kv_heads=hkv, head_dim=8, method="razor", parameters={},
                       scores=induction, echo=echo, induction=induction)
    shape = ModelShape(num_layers=n_l, num_q_heads=hq, num_kv_heads=hkv, head_dim=8)
    cfg = KVPolicyConfig(policy="razor", razor_fraction=0.06, budget=64).validate()  # 1 echo + 1 induction head of 20
    pol = RazorAttention.from_config(cfg, shape, prof)
    assert pol.retrieval_heads[9, 1] and pol.retrieval_heads[3, 0] and int(pol.retrieval_heads.sum()) == 2
    matched = RazorAttention.from_config(KVPolicyConfig(policy="razor", razor_heads="budget").validate(), shape, prof)
    assert matched.head_order[:3].tolist() == [19, 3 * hkv + 0, 5 * hkv + 1]


@pytest.mark.parametrize("seq_len, budget", [(97, 20), (54, 54), (301, 9), (5, 3)])
def test_razor_compression_and_compensation(seq_len, budget):
    torch.manual_seed(seq_len + budget)
    n_l, n_h, d = 2, 3, 7
    mask = torch.tensor([[True, False, False], [False, False, True]])
    pol = RazorAttention(retrieval_heads=mask, sink_size=4, window_size=4)
    planned = pol.plan_budgets(seq_len, budget, n_l, n_h)
    for layer in range(n_l):
        k = torch.randn(n_h, seq_len, d)
        v = torch.randn(n_h, seq_len, d)
        out = compress_layer(pol, layer, torch.zeros(0), k, v, budget, planned)
        assert out.comp_k is not None and out.comp_v is not None and out.comp_count is not None
        for h in range(n_h):
            idx = out.indices[out.indptr[h] : out.indptr[h + 1]]
            dropped = sorted(set(range(seq_len)) - set(idx.tolist()))
            if mask[layer, h]:
                assert idx.tolist() == list(range(seq_len))
            elif budget >= 8:
                b = min(budget, seq_len)
                assert idx.tolist() == list(range(4)) + list(range(seq_len - (b - 4), seq_len))
            else:
                assert idx.tolist() == list(range(seq_len - budget, seq_len))
            assert int(out.comp_count[h]) == len(dropped)
            if dropped:
                torch.testing.assert_close(out.comp_k[h], k[h, dropped].mean(0))
                torch.testing.assert_close(out.comp_v[h], v[h, dropped].mean(0))
                # attention with the comp state == the comp key repeated len(dropped) times
                q = torch.randn(2, d)
                rows = slice(int(out.indptr[h]), int(out.indptr[h + 1]))
                kept_k, kept_v = out.k_flat[rows], out.v_flat[rows]
                keys = torch.cat([kept_k, out.comp_k[h].expand(len(dropped), d)])
                vals = torch.cat([kept_v, out.comp_v[h].expand(len(dropped), d)])
                logits = q @ keys.T * 0.3
                naive_o = torch.softmax(logits, -1) @ vals
                bias = torch.cat([torch.zeros(idx.numel()), torch.tensor([math.log(len(dropped))])])
                k_comp = torch.cat([kept_k, out.comp_k[h : h + 1]])
                v_comp = torch.cat([kept_v, out.comp_v[h : h + 1]])
                o, lse = attend(q, k_comp, v_comp, 0.3, bias)
                torch.testing.assert_close(o, naive_o, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-6)
            else:
                assert (out.comp_k[h] == 0).all()


# --------------------------------------------------------------------------- #
# compress_layer
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "headkv", "adakv", "streamingllm", "full"])
@pytest.mark.parametrize("seq_len", [5, 97])
def test_compress_layer_gathers_the_selected_rows(name, seq_len):
    torch.manual_seed(seq_len)
    pol = make_policy(name, num_layers=2, num_heads=3)
    group, d, budget = 3, 7, 13
    planned = pol.plan_budgets(seq_len, budget, 2, 3)
    w = min(pol.window_size, seq_len)
    q = torch.randn(3 * group, w, d)
    k = torch.randn(3, seq_len, d).bfloat16()
    v = torch.randn(3, seq_len, d).bfloat16()
    out = compress_layer(pol, 1, q, k, v, budget, planned)
    assert out.comp_k is None and out.comp_count is None
    assert out.indptr.dtype == torch.int64 and out.indptr[0] == 0 and out.indptr[-1] == out.indices.numel()
    assert out.k_flat.dtype == torch.bfloat16 and out.k_flat.shape == (out.indices.numel(), d)
    scores = pol.token_scores(q, k, 1)
    want = pol.select(scores, pol.layer_budgets(1, seq_len, budget, scores, planned))
    for h in range(3):
        idx = out.indices[out.indptr[h] : out.indptr[h + 1]]
        assert idx.tolist() == want[h].tolist()
        assert torch.equal(out.k_flat[out.indptr[h] : out.indptr[h + 1]], k[h, idx])
        assert torch.equal(out.v_flat[out.indptr[h] : out.indptr[h + 1]], v[h, idx])
    if name == "full":
        assert out.lengths.tolist() == [seq_len] * 3
    elif name in ("snapkv", "adakv", "streamingllm"):
        assert int(out.lengths.sum()) == 3 * min(budget, seq_len)


def test_fullkv_keeps_everything():
    pol = FullKV()
    k = torch.randn(2, 33, 5)
    out = compress_layer(pol, 0, torch.zeros(0), k, k, 1, pol.plan_budgets(33, 1, 1, 2))
    assert out.indices.tolist() == list(range(33)) * 2
