"""Question-agnostic scoring (issue 48): ``self`` and ``reconstruct`` rank a document's tokens by
the most attention any of a span's queries gives them (policies.scoring.max_attention),
accumulated chunk by chunk during the prefill (CompressionManager.capture_queries)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.policies.base import compress_layer
from headkv_sglang.policies.registry import build_policy
from headkv_sglang.policies.scoring import (accumulated_attention, max_attention, observation_window_scores,
                                            pool_mass)
from headkv_sglang.reconstruct import RECONSTRUCT_KEY, content_start, make_mark, reconstruction_ids, reconstruction_mark
from headkv_sglang.serving.requests import share_key
from test_registry import write_profiles


def naive_max_attention(q, k, q_start, accumulate=False):
    """Per KV head, per query head, per query: a plain causal softmax; the max per key (or,
    ``accumulate``, H2O's sum over the queries and the group's query heads)."""
    hq, n, d = q.shape
    hk, t, _ = k.shape
    t = min(t, q_start + n)
    g = hq // hk
    out = torch.zeros(hk, 1 if accumulate else g, t, dtype=torch.float64)
    for h in range(hq):
        kv = h // g
        for i in range(n):
            p = q_start + i
            logits = [float(q[h, i].double() @ k[kv, j].double()) / math.sqrt(d) for j in range(p + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            s = sum(e)
            for j in range(min(p + 1, t)):
                if accumulate:
                    out[kv, 0, j] += e[j] / s
                else:
                    out[kv, h % g, j] = max(out[kv, h % g, j], e[j] / s)
    return out


@pytest.mark.parametrize("hq,hk,n,t,q_start,block", [(6, 2, 7, 19, 12, 3), (3, 3, 5, 5, 0, 2),
                                                      (9, 3, 11, 37, 20, 4), (4, 1, 13, 13, 0, 64)])
def test_max_attention_matches_a_naive_reference(hq, hk, n, t, q_start, block):
    g = torch.Generator().manual_seed(hq * 100 + t)
    q = torch.randn(hq, n, 5, generator=g)
    k = torch.randn(hk, t, 5, generator=g)
    got = max_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), q_start, block=block)
    ref = naive_max_attention(q.to(torch.bfloat16).float(), k.to(torch.bfloat16).float(), q_start)
    assert got.shape == ref.shape == (hk, hq // hk, min(t, q_start + n))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("hq,hk,n,t,q_start,block", [(6, 2, 7, 19, 12, 3), (3, 3, 5, 5, 0, 2),
                                                      (9, 3, 11, 37, 20, 4), (4, 1, 13, 13, 0, 64), (2, 1, 0, 9, 4, 3)])
def test_accumulated_attention_matches_a_naive_reference(hq, hk, n, t, q_start, block):
    g = torch.Generator().manual_seed(hq * 100 + t + 1)
    q = torch.randn(hq, n, 5, generator=g)
    k = torch.randn(hk, t, 5, generator=g)
    got = accumulated_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), q_start, block=block)
    ref = naive_max_attention(q.to(torch.bfloat16).float(), k.to(torch.bfloat16).float(), q_start, accumulate=True)
    assert got.shape == ref.shape == (hk, 1, min(t, q_start + n))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    if n:  # every query's probabilities sum to one: the masses of a KV head sum to its queries x group
        torch.testing.assert_close(got.sum(-1), torch.full((hk, 1), float(n * hq // hk)), atol=1e-3, rtol=1e-4)


def test_max_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        max_attention(torch.randn(5, 3, 4), torch.randn(2, 9, 4), 0)
    with pytest.raises(ValueError, match="q must be"):
        max_attention(torch.randn(4, 3, 4), torch.randn(2, 9, 5), 0)


def test_pooling_is_the_snapkv_scores_own():
    """observation_window_scores = its masses through pool_mass (the refactor changed nothing)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 4, 8, generator=g), torch.randn(2, 29, 8, generator=g)
    scores = observation_window_scores(q, k, 4, 5, "maxpool", "mean")
    logits = torch.einsum("hgwd,htd->hgwt", q.reshape(2, 3, 4, 8), k) / math.sqrt(8)
    pos = torch.arange(29)
    logits = logits.masked_fill(pos[None, :] > (25 + torch.arange(4))[:, None], -math.inf)
    mass = torch.softmax(logits, -1).sum(2)[..., :25]
    torch.testing.assert_close(scores[:, :25], pool_mass(mass, 5, "maxpool", "mean"))
    assert torch.isinf(scores[:, 25:]).all()


@pytest.mark.parametrize("policy,extra", [("snapkv", {}), ("adakv", {}), ("pyramidkv", {}),
                                          ("snapkv", {"agnostic_kernel": 5}), ("adakv", {"agnostic_kernel": 3})])
def test_compress_layer_ranks_by_the_masses(policy, extra):
    shape = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=8)
    cfg = KVPolicyConfig(policy=policy, budget=9, window=2, kernel_size=5, **extra).validate()
    pol = build_policy(cfg, shape)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 31, 8, generator=g), torch.randn(2, 31, 8, generator=g)
    mass = torch.rand(2, 3, 31, generator=g)
    planned = pol.plan_budgets(31, 9, 2, 2)
    out = compress_layer(pol, 0, torch.zeros(6, 2, 8), k, v, 9, planned, mass=mass)
    want = pol.scores_from_mass(mass)
    assert torch.isinf(want[:, -2:]).all()
    # KVzip's aggregation (the group's most), after a max over each token's neighbours within
    # agnostic_kernel // 2 in the prefix (none by default), written out token by token
    r = cfg.agnostic_kernel // 2
    agg = torch.zeros(2, 29)
    for h in range(2):
        for t in range(29):
            agg[h, t] = max(float(mass[h, g, u]) for g in range(3) for u in range(max(0, t - r), min(29, t + r + 1)))
    for h in range(2):
        kept = out.keep[h].nonzero().flatten().tolist()
        prefix = [i for i in kept if i < 29 and not math.isinf(float(want[h, i]))]
        if prefix:  # every kept prefix token outranks every dropped one (sinks aside)
            dropped = [i for i in range(29) if i not in kept]
            assert min(float(agg[h, i]) for i in prefix) >= max(float(agg[h, i]) for i in dropped) - 1e-6


def test_the_window_policies_refuse_masses_only_where_they_have_no_ranking():
    shape = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=8)
    pol = build_policy(KVPolicyConfig(policy="streamingllm", budget=9).validate(), shape)
    with pytest.raises(NotImplementedError):
        pol.scores_from_mass(torch.rand(2, 3, 20))
    # compress_layer ignores the masses of a position-only policy (its sinks + recent tokens)
    k = torch.randn(2, 20, 8)
    out = compress_layer(pol, 0, torch.zeros(6, 4, 8), k, k, 9, pol.plan_budgets(20, 9, 2, 2),
                         mass=torch.rand(2, 3, 20))
    assert out.keep.sum(1).tolist() == [9, 9]


SHAPE = ModelShape(num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=8)


def _manager_run(chunks, span, keep, seq_len, cfg, accumulate=False):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(SHAPE.num_layers, seq_len, 6, 8, generator=g)
    k = torch.randn(SHAPE.num_layers, seq_len, 2, 8, generator=g)
    v = torch.randn(SHAPE.num_layers, seq_len, 2, 8, generator=g)
    m = CompressionManager(SHAPE, 200, 4, torch.float32, "cpu")
    m.begin_extend(0, "r", cfg.obs_window, span=span, agnostic=True, keep=keep, accumulate=accumulate)
    pos = 0
    for n in chunks:
        for layer in range(2):
            m.capture_queries(layer, 0, q[layer, pos:pos + n], pos=pos, get_k=lambda end, layer=layer: k[layer, :end])
        pos += n
    assert pos == seq_len
    masses = {layer: m.state(0).mass[layer].clone() for layer in range(2)}
    n = keep or seq_len
    rec = m.compress(0, cfg, n, lambda layer: (k[layer], v[layer]))
    return masses, rec, q, k


@pytest.mark.parametrize("chunks", [[37], [10, 27], [5, 5, 5, 22], [1, 36]])
def test_chunked_capture_is_one_pass_and_compresses_the_kept_tokens(chunks):
    cfg = KVPolicyConfig(policy="snapkv", budget=7, window=2, kernel_size=3).validate()
    # reconstruct-like: the document is [0, 17), its copy [20, 37) scores it
    masses, rec, q, k = _manager_run(chunks, (20, 37), 17, 37, cfg)
    for layer in range(2):
        ref = max_attention(q[layer, 20:37].transpose(0, 1), k[layer].transpose(0, 1), 20)[..., :17]
        torch.testing.assert_close(masses[layer], ref)
    assert rec.prompt_len == 17
    # self: every query of the prompt
    masses, rec, q, k = _manager_run(chunks, (0, 37), None, 37, cfg)
    ref = max_attention(q[1].transpose(0, 1), k[1].transpose(0, 1), 0)
    torch.testing.assert_close(masses[1], ref)
    assert rec.prompt_len == 37


@pytest.mark.parametrize("chunks", [[37], [10, 27], [5, 5, 5, 22]])
def test_accumulated_capture_sums_over_chunks_and_keeps_the_top_sums(chunks):
    """kv_scoring accumulated (H2O / D2O): a chunked prefill's masses are the whole prompt's
    accumulated attention (summed across chunks), and every (layer, KV head) keeps its window
    plus the positions with the largest sums."""
    cfg = KVPolicyConfig(policy="snapkv", budget=7, window=2, scoring="accumulated",
                         agnostic_select="policy").validate()
    g = torch.Generator().manual_seed(len(chunks))
    q = torch.randn(2, 37, 6, 8, generator=g) * 2
    k = torch.randn(2, 37, 2, 8, generator=g)
    v = torch.zeros(2, 37, 2, 8)
    v[..., 0] = torch.arange(37, dtype=torch.float32)[None, :, None]  # each value carries its position
    m = CompressionManager(SHAPE, 200, 4, torch.float32, "cpu")
    m.begin_extend(0, "r", cfg.obs_window, span=(0, 37), agnostic=True, accumulate=True)
    pos = 0
    for n in chunks:
        for layer in range(2):
            m.capture_queries(layer, 0, q[layer, pos:pos + n], pos=pos, get_k=lambda end, layer=layer: k[layer, :end])
        pos += n
    masses = {layer: m.state(0).mass[layer].clone() for layer in range(2)}
    rec = m.compress(0, cfg, 37, lambda layer: (k[layer], v[layer]))
    for layer in range(2):
        ref = accumulated_attention(q[layer].transpose(0, 1), k[layer].transpose(0, 1), 0)
        torch.testing.assert_close(masses[layer], ref, atol=1e-5, rtol=1e-5)
        kept = _kept_positions(m.pool, rec, layer)
        for h in range(2):
            top = sorted(range(35), key=lambda t: (-float(ref[h, 0, t]), t))[:5]
            assert kept[h] == sorted(top) + [35, 36], (layer, h, kept[h])
    assert rec.selection == "policy"
    with pytest.raises(ValueError, match="question-agnostic"):
        CompressionManager(SHAPE, 10, 4, torch.float32, "cpu").begin_extend(0, "r", 2, span=(0, 5), accumulate=True)


def test_agnostic_capture_needs_a_span_and_keys():
    m = CompressionManager(SHAPE, 50, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="span"):
        m.begin_extend(0, "r", 2, agnostic=True)
    m.begin_extend(0, "r", 2, span=(0, 5), agnostic=True)
    with pytest.raises(ValueError, match="get_k"):
        m.capture_queries(0, 0, torch.randn(5, 6, 8), pos=0)


def test_reconstruction_layout():
    header, tail, repeat = (7, 8), (90, 91), (50, 51, 52)
    ids = [1, 2, 7, 8, 30, 31, 32, 33]  # system turn, user header, the document
    assert content_start(ids, header) == 4 and content_start(ids, ()) == 0
    ext, copy_start = reconstruction_ids(ids, repeat, tail, header)
    assert ext[:8] == ids and ext[8:11] == list(repeat) and ext[11:13] == list(tail)
    assert copy_start == 13 and ext[13:] == [30, 31, 32, 33]
    mark = make_mark(ids, ext, copy_start)
    assert reconstruction_mark({RECONSTRUCT_KEY: mark}) == (8, 13) == reconstruction_mark({RECONSTRUCT_KEY: mark}, ext)
    # a mark is its own prompt's: another prompt (a batch sharing one sampling-params dict) does not match
    other = [1, 2, 7, 8, 30, 31, 32, 34] + ext[8:]
    assert reconstruction_mark({RECONSTRUCT_KEY: mark}, other) is None
    assert reconstruction_mark({RECONSTRUCT_KEY: mark}, ext[:-1]) is None
    assert reconstruction_mark({RECONSTRUCT_KEY: [0, 13, 17, 0]}) is None and reconstruction_mark(None) is None
    with pytest.raises(ValueError):
        reconstruction_ids([], repeat, tail, header)


def test_scoring_resolution_and_sharing():
    cfg = KVPolicyConfig(policy="snapkv", budget=64, share=True).validate()
    assert cfg.scoring == "auto"
    assert cfg.resolve_scoring(document=False).scoring == "question"
    assert cfg.resolve_scoring(document=True).scoring == "reconstruct"
    assert cfg.resolve_scoring(document=True, reconstructed=False).scoring == "self"
    w = KVPolicyConfig(policy="snapkv", budget=64, share=True, scoring="window").validate()
    assert w.resolve_scoring(document=True).scoring == "window"
    # a copy scored one way serves requests scored another (the questions adopt the document's)
    assert share_key(cfg.resolve_scoring(True)) == share_key(cfg.resolve_scoring(False))
    pooled = dataclasses.replace(cfg, agnostic_kernel=7).validate()
    assert share_key(pooled.resolve_scoring(True)) == share_key(cfg)
    for select in ("policy", "global"):  # the questions need not repeat how the document's copy was selected
        chosen = dataclasses.replace(cfg, agnostic_select=select).validate()
        assert share_key(chosen.resolve_scoring(True)) == share_key(cfg)
    assert share_key(dataclasses.replace(cfg, kernel_size=7).validate()) != share_key(cfg)  # what it holds differs
    from headkv_sglang.question import QuestionFinder
    assert KVPolicyConfig(policy="snapkv", budget=64, scoring="self").validate().scoring_span(
        QuestionFinder(), list(range(50)), 50) == (0, 50)


def naive_global_budgets(scores, total, w):
    """Every (layer, head, position) before the windows, best first (ties: lower layer, head,
    position), the first ``total - windows`` counted per row, plus each row's window."""
    L, H, T = scores.shape
    w = min(w, T)
    cells = [(-float(scores[l, h, t]), l, h, t) for l in range(L) for h in range(H) for t in range(T - w)]
    cells.sort()
    out = torch.full((L, H), w, dtype=torch.int64)
    for _, l, h, _t in cells[:min(total, L * H * T) - L * H * w]:
        out[l, h] += 1
    return out


@pytest.mark.parametrize("L,H,T,w,total,levels", [(3, 2, 17, 3, 40, 0), (2, 3, 11, 1, 23, 4), (5, 1, 9, 2, 44, 3),
                                                 (1, 4, 7, 0, 9, 0), (2, 2, 13, 5, 100, 0)])
def test_global_budgets_match_a_naive_global_top(L, H, T, w, total, levels):
    from headkv_sglang.policies.budgets import global_budgets
    g = torch.Generator().manual_seed(L * 1000 + T)
    scores = torch.rand(L, H, T, generator=g)
    if levels:  # many ties: they go to the lower (layer, head, position)
        scores = (scores * levels).floor()
    scores[..., T - min(w, T):] = math.inf
    got = global_budgets(scores, total, w)
    assert got.tolist() == naive_global_budgets(scores, total, w).tolist()
    assert int(got.sum()) == min(total, L * H * T)


def test_global_budgets_below_the_windows_spread_evenly():
    from headkv_sglang.policies.budgets import global_budgets
    got = global_budgets(torch.rand(2, 3, 20), 14, 4)
    assert sorted(got.flatten().tolist()) == [2, 2, 2, 2, 3, 3] and int(got.sum()) == 14
    with pytest.raises(ValueError, match="num_layers"):
        global_budgets(torch.rand(3, 20), 14, 4)


def _kept_positions(pool, rec, layer):
    """Each row's kept positions, read back from the pages (the values carry their position)."""
    lp = rec.layers[layer]
    _, v, mask = pool.gather_padded(lp)
    return [sorted(int(x) for x in v[h, :, 0][mask[h]].round().tolist()) for h in range(v.shape[0])]


@pytest.mark.parametrize("policy,chunks", [("snapkv", [43]), ("snapkv", [9, 20, 14]), ("headkv", [30, 13]),
                                           ("adakv", [43]), ("pyramidkv", [1, 42])])
def test_global_selection_keeps_the_global_top_inside_the_forward(tmp_path, policy, chunks):
    """agnostic_select 'global' in the prefill forward (chunked capture, every layer compressed
    after the last one's attention) keeps, for every (layer, KV head), its window plus exactly the
    positions a naive global top over every layer's scores picks, and as many tokens in all as
    the policy's own plan."""
    shape = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)
    doc, seq_len, span = 19, 43, (24, 43)  # reconstruct-like: the copy [24, 43) scores the document [0, 19)
    extra = {"head_profile": write_profiles(tmp_path, shape, random.Random(3))["r2"]} if policy == "headkv" else {}
    cfg = KVPolicyConfig(policy=policy, budget=6, window=2, agnostic_select="global", **extra).validate()
    g = torch.Generator().manual_seed(len(chunks) * 7 + len(policy))
    q = torch.randn(3, seq_len, 6, 8, generator=g) * 2
    k = torch.randn(3, seq_len, 2, 8, generator=g)
    v = torch.zeros(3, seq_len, 2, 8)
    v[..., 0] = torch.arange(seq_len, dtype=torch.float32)[None, :, None]  # each value carries its position
    m = CompressionManager(shape, 300, 4, torch.float32, "cpu")
    m.begin_extend(0, "r", cfg.obs_window, span=span, agnostic=True, keep=doc, compress_at=(cfg, seq_len))
    read = []
    pos = 0
    for n in chunks:
        for layer in range(3):
            m.capture_queries(layer, 0, q[layer, pos:pos + n], pos=pos, get_k=lambda end, layer=layer: k[layer, :end])

            def get_kv(i, end=pos + n):
                read.append(i)
                return k[i, :end], v[i, :end]

            m.on_prefill_layer(layer, 0, pos + n, get_kv)
        pos += n
    assert m.take_forward_outcome(0) == "ok"
    assert read == [0, 1, 2]  # nothing before the last layer, then every layer
    rec = m.state(0).record
    assert rec.prompt_len == doc
    pol = build_policy(cfg, shape)
    scores = torch.stack([pol.scores_from_mass(
        max_attention(q[layer, 24:43].transpose(0, 1), k[layer].transpose(0, 1), 24)[..., :doc])
        for layer in range(3)])
    planned = pol.plan_budgets(doc, 6, 3, 2)
    total = int(planned.sum()) if planned is not None else 3 * 2 * 6
    want = naive_global_budgets(scores, total, 2)
    for layer in range(3):
        kept = _kept_positions(m.pool, rec, layer)
        for h in range(2):
            assert len(kept[h]) == int(want[layer, h])
            assert kept[h][-2:] == [doc - 2, doc - 1]  # the window
            top = sorted(range(doc - 2), key=lambda t: (-float(scores[layer, h, t]), t))[:int(want[layer, h]) - 2]
            assert kept[h][:-2] == sorted(top)
    assert rec.kept_tokens == total
    assert m.pages_bound(cfg.resolve_scoring(True), doc) >= len(rec.page_ids)


def test_global_selection_differs_from_the_policys_and_spreads_unevenly():
    """The same captured scores under 'policy' keep each row its own budget (snapkv: 6 each); under
    'global' the rows' counts follow the scores (and the admission bound covers them)."""
    shape = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)
    counts = {}
    for select in ("policy", "global"):
        cfg = KVPolicyConfig(policy="snapkv", budget=6, window=2, agnostic_select=select).validate()
        g = torch.Generator().manual_seed(5)
        q = torch.randn(3, 43, 6, 8, generator=g) * 3
        k = torch.randn(3, 43, 2, 8, generator=g)
        m = CompressionManager(shape, 300, 4, torch.float32, "cpu")
        m.begin_extend(0, "r", cfg.obs_window, span=(24, 43), agnostic=True, keep=19)
        for layer in range(3):
            m.capture_queries(layer, 0, q[layer], pos=0, get_k=lambda end, layer=layer: k[layer, :end])
        rec = m.compress(0, cfg, 19, lambda layer: (k[layer, :19], k[layer, :19]))
        counts[select] = [rec.layers[i].lengths.tolist() for i in range(3)]
        assert rec.kept_tokens == 36
        assert rec.selection == select  # what /server_info reports for the request
    assert counts["policy"] == [[6, 6]] * 3
    assert counts["global"] != counts["policy"] and sum(map(sum, counts["global"])) == 36
    # the last queries' attention ranks (no question-agnostic scores): no selection to report
    m = CompressionManager(shape, 300, 4, torch.float32, "cpu")
    m.begin_extend(0, "r", cfg.obs_window)
    for layer in range(3):
        m.capture_queries(layer, 0, q[layer, :19])
    assert m.compress(0, cfg, 19, lambda layer: (k[layer, :19], k[layer, :19])).selection is None
