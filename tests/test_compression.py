"""CompressionManager against naive dense attention over exactly the kept tokens (CPU, fast).

Policies that need no head profile only: full, snapkv, pyramidkv, adakv, streamingllm.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from ragged_oracle import kernel_attend

from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.policies import AdaKV, FullKV, PyramidKV, SnapKV, StreamingLLM, compress_layer
from headkv_sglang.policies.registry import pages_upper_bound
from headkv_sglang.kv.pool import PoolFullError
from headkv_sglang.reference import dense_decode, paged_to_flat

POLICIES = ("full", "snapkv", "pyramidkv", "adakv", "streamingllm")
SHAPE = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)  # GQA group 3
SHAPE_G1 = ModelShape(num_layers=2, num_q_heads=2, num_kv_heads=2, head_dim=64)  # group 1


def make_cfg(policy: str, budget: int, window: int, **kw) -> KVPolicyConfig:
    if policy == "streamingllm":
        kw.setdefault("sink_size", min(4, budget - 1))
    return KVPolicyConfig(policy=policy, budget=budget, window=window, **kw).validate()


def oracle_policy(cfg: KVPolicyConfig, window: int):
    """The policy built by hand from the config's fields (not through build_policy)."""
    obs = dict(window_size=window, kernel_size=cfg.kernel_size, pooling=cfg.pooling)
    return {
        "full": lambda: FullKV(),
        "snapkv": lambda: SnapKV(**obs),
        "pyramidkv": lambda: PyramidKV(beta=cfg.pyramid_beta, **obs),
        "adakv": lambda: AdaKV(floor_alpha=cfg.floor_alpha, **obs),
        "streamingllm": lambda: StreamingLLM(sink_size=cfg.sink_size, window_size=window),
    }[cfg.policy]()


class Prompt:
    """Random per-layer q ``[T, Hq, D]``, k/v ``[T, H, D]`` in SGLang's token-pool layout."""

    def __init__(self, shape: ModelShape, T: int, seed: int, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        L, Hq, H, D = shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim
        self.T = T
        self.q = [torch.randn(T, Hq, D, generator=g).to(dtype) for _ in range(L)]
        self.k = [torch.randn(T, H, D, generator=g).to(dtype) for _ in range(L)]
        self.v = [torch.randn(T, H, D, generator=g).to(dtype) for _ in range(L)]

    def get_kv(self, layer: int):
        return self.k[layer], self.v[layer]


def prefill(mgr: CompressionManager, idx: int, cfg: KVPolicyConfig, p: Prompt, chunks: list[int] | None = None,
            start: int = 0) -> None:
    """Capture queries chunk by chunk from position ``start`` (a prefix hit skips ``[0, start)``)."""
    mgr.begin_extend(idx, f"rid{idx}", cfg.obs_window)
    bounds = [start]
    for c in chunks or [p.T - start]:
        bounds.append(min(bounds[-1] + c, p.T))
    assert bounds[-1] == p.T, bounds
    for a, b in zip(bounds, bounds[1:]):
        for layer in range(mgr.shape.num_layers):
            mgr.capture_queries(layer, idx, p.q[layer][a:b])


def expected_kept(cfg: KVPolicyConfig, shape: ModelShape, p: Prompt, window: int) -> list[list[torch.Tensor]]:
    """Per layer, per KV head: the kept positions, by compress_layer on the same inputs."""
    pol = oracle_policy(cfg, window)
    w = min(window, p.T)
    planned = pol.plan_budgets(p.T, cfg.budget, shape.num_layers, shape.num_kv_heads)
    out = []
    for layer in range(shape.num_layers):
        q_win = p.q[layer][p.T - w:].transpose(0, 1)
        comp = compress_layer(pol, layer, q_win, p.k[layer].transpose(0, 1), p.v[layer].transpose(0, 1),
                              cfg.budget, planned)
        b = comp.indptr.tolist()
        out.append([comp.indices[b[h]:b[h + 1]] for h in range(shape.num_kv_heads)])
    return out


def naive_attention(q, k_rows, v_rows, k_tail, v_tail, q_pos, prompt_len, scale):
    """float64, one (token, KV head) at a time: the G query heads of KV head h (``h*G .. h*G+G-1``)
    see h's kept tokens and the tail positions ``<= q_pos[t]``."""
    n, Hq, D = q.shape
    H = len(k_rows)
    G = Hq // H
    out = torch.zeros(n, Hq, D, dtype=torch.float64)
    for t in range(n):
        vis = max(0, min(k_tail.shape[0], int(q_pos[t]) - prompt_len + 1))
        for h in range(H):
            keys = torch.cat([k_rows[h].double(), k_tail[:vis, h].double()])
            vals = torch.cat([v_rows[h].double(), v_tail[:vis, h].double()])
            logits = q[t, h * G:(h + 1) * G].double() @ keys.T * scale
            out[t, h * G:(h + 1) * G] = torch.softmax(logits, -1) @ vals
    return out


def rebuild_rows(mgr: CompressionManager, idx: int, layer: int):
    """Each KV head's kept keys and values, read back from the pool pages via FlashInfer's CSR view."""
    lp = mgr.records[idx].layers[layer]
    rows = []
    for pages in (mgr.pool.k_pages, mgr.pool.v_pages):
        flat, indptr = paged_to_flat(pages, lp.kv_indptr, lp.kv_indices, lp.kv_last_page_len)
        b = indptr.tolist()
        rows.append([flat[b[h]:b[h + 1]] for h in range(len(b) - 1)])
    return rows


# --------------------------------------------------------------------------- #
# compress + attend against the dense oracle
# --------------------------------------------------------------------------- #
G3, G1 = SHAPE, SHAPE_G1
CASES = [
    # policy, T, budget, window, page_size, chunks, shape
    ("full", 54, 16, 4, 3, None, G3),
    ("full", 7, 1, 1, 16, [2, 5], G1),
    ("snapkv", 97, 17, 5, 3, [40, 3, 54], G3),
    ("snapkv", 97, 17, 5, 3, [40, 3, 54], G1),
    ("snapkv", 54, 9, 9, 1, [1, 1, 52], G3),
    ("snapkv", 7, 3, 2, 16, None, G1),
    ("pyramidkv", 97, 21, 6, 3, [60, 37], G3),
    ("pyramidkv", 301, 40, 8, 16, [128, 128, 45], G1),
    ("adakv", 97, 19, 5, 1, [90, 2, 5], G3),
    ("adakv", 54, 13, 3, 16, None, G1),
    ("streamingllm", 97, 11, 8, 3, [50, 47], G3),
    ("streamingllm", 54, 6, 2, 1, None, G1),
]


@pytest.mark.parametrize("policy, T, budget, window, page_size, chunks, shape", CASES,
                         ids=[f"{c[0]}-T{c[1]}-B{c[2]}-w{c[3]}-ps{c[4]}-G{c[6].num_q_heads // c[6].num_kv_heads}"
                              for c in CASES])
def test_compress_then_attend_equals_dense_over_kept_tokens(shape, policy, T, budget, window, page_size, chunks):
    torch.manual_seed(T * 31 + budget)
    cfg = make_cfg(policy, budget, window)
    p = Prompt(shape, T, seed=T + budget + shape.head_dim)
    mgr = CompressionManager(shape, num_pages=2000, page_size=page_size, dtype=torch.float32, device="cpu", only_if_smaller=False)
    prefill(mgr, 5, cfg, p, chunks)
    rec = mgr.compress(5, cfg, T, p.get_kv)
    kept = expected_kept(cfg, shape, p, window)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    B = min(budget, T)
    assert rec.prompt_len == T and rec.policy == policy and rec.budget == budget
    assert rec.kept_tokens == sum(int(t.numel()) for lk in kept for t in lk)

    for layer in range(L):
        lengths = mgr.records[5].layers[layer].lengths.tolist()
        for h in range(H):
            idx = kept[layer][h].tolist()
            assert lengths[h] == len(idx)
            assert idx == sorted(set(idx)) and all(0 <= i < T for i in idx)
            # Invariants that hold whatever the scores: the window is kept; budgets respected.
            w_kept = min(window, B) if policy != "full" else T
            assert set(range(T - w_kept, T)) <= set(idx), f"layer {layer} head {h}: window not kept"
            if policy == "full":
                assert idx == list(range(T))
            elif policy in ("snapkv", "streamingllm"):
                assert len(idx) == B
            if policy == "streamingllm":
                # sinks, then the most recent tokens; the last `window` always win over sinks
                s = min(cfg.sink_size, B - min(window, B))
                assert idx == sorted(set(range(s)) | set(range(T - (B - s), T)))
        if policy == "adakv":  # heads of a layer share its H * B tokens by score
            assert sum(lengths) == H * B, lengths
        if policy == "pyramidkv":  # heads of a layer share one budget
            assert len(set(lengths)) == 1, lengths
        # The pages hold exactly the kept tokens.
        k_rows, v_rows = rebuild_rows(mgr, 5, layer)
        for h in range(H):
            assert torch.equal(k_rows[h], p.k[layer][kept[layer][h], h]), f"layer {layer} head {h}: keys"
            assert torch.equal(v_rows[h], p.v[layer][kept[layer][h], h]), f"layer {layer} head {h}: values"
    if policy in ("pyramidkv", "adakv"):
        assert rec.kept_tokens == L * H * B

    scale = 1.0 / math.sqrt(D)
    g = torch.Generator().manual_seed(T)
    for n, m in ((1, 0), (1, 5), (3, 7)):
        k_tail = torch.randn(m, H, D, generator=g)
        v_tail = torch.randn(m, H, D, generator=g)
        q = torch.randn(n, shape.num_q_heads, D, generator=g)
        # decode (n=1): the query is the newest token; extend: one query per new tail token
        q_pos = torch.arange(T + m - n, T + m, dtype=torch.int64) if m else torch.full((n,), T - 1)
        for layer in range(L):
            got = kernel_attend(mgr, layer, 5, q, k_tail, v_tail, q_pos, scale)
            k_rows = [p.k[layer][kept[layer][h], h] for h in range(H)]
            v_rows = [p.v[layer][kept[layer][h], h] for h in range(H)]
            want = naive_attention(q, k_rows, v_rows, k_tail, v_tail, q_pos, T, scale)
            assert got.shape == q.shape and got.dtype == q.dtype
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5,
                                       msg=lambda s: f"layer {layer}, n={n}, m={m}: {s}")
    mgr.check_integrity()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T, page_size, shape", [(1, 1, SHAPE), (7, 3, SHAPE_G1), (97, 16, SHAPE)],
                         ids=["T1-ps1-G3", "T7-ps3-G1", "T97-ps16-G3"])
def test_budget_at_least_prompt_equals_dense_decode(policy, T, page_size, shape):
    """budget >= T keeps everything: attend == dense decode over prompt + tail."""
    torch.manual_seed(T)
    budget = T + (T % 5) + (5 if policy == "streamingllm" else 0)
    cfg = make_cfg(policy, budget, window=min(8, budget))
    p = Prompt(shape, T, seed=3 * T + len(policy))
    mgr = CompressionManager(shape, num_pages=4000, page_size=page_size, dtype=torch.float32, device="cpu", only_if_smaller=False)
    prefill(mgr, 0, cfg, p, chunks=[max(1, T // 2), T])
    rec = mgr.compress(0, cfg, T, p.get_kv)
    assert rec.kept_tokens == T * shape.num_layers * shape.num_kv_heads
    scale = 1.0 / math.sqrt(shape.head_dim)
    for m in (0, 6):
        k_tail = torch.randn(m, shape.num_kv_heads, shape.head_dim)
        v_tail = torch.randn(m, shape.num_kv_heads, shape.head_dim)
        q = torch.randn(1, shape.num_q_heads, shape.head_dim)
        for layer in range(shape.num_layers):
            got = kernel_attend(mgr, layer, 0, q, k_tail, v_tail, torch.tensor([T + max(m, 1) - 1]), scale)
            want, _ = dense_decode(q[0], torch.cat([p.k[layer], k_tail]), torch.cat([p.v[layer], v_tail]), scale)
            torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_attend_bfloat16_pool_returns_query_dtype():
    torch.manual_seed(0)
    cfg = make_cfg("snapkv", 12, 4)
    p = Prompt(SHAPE, 54, seed=1, dtype=torch.bfloat16)
    mgr = CompressionManager(SHAPE, num_pages=200, page_size=3, dtype=torch.bfloat16, device="cpu", only_if_smaller=False)
    prefill(mgr, 1, cfg, p)
    mgr.compress(1, cfg, 54, p.get_kv)
    q = torch.randn(1, 6, 8).to(torch.bfloat16)
    got = kernel_attend(mgr, 0, 1, q, p.k[0][:0], p.v[0][:0], torch.tensor([53]), 8 ** -0.5)
    assert got.dtype == torch.bfloat16
    kept = expected_kept(cfg, SHAPE, p, 4)
    want = naive_attention(q, [p.k[0][kept[0][h], h] for h in range(2)], [p.v[0][kept[0][h], h] for h in range(2)],
                           p.k[0][:0], p.v[0][:0], [53], 54, 8 ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- #
# observation-window capture
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("window, chunks", [(8, [3, 1, 10, 2, 5]), (5, [1, 1, 1, 1, 1, 1, 1]), (4, [9]),
                                            (16, [7, 30, 2]), (6, [2, 5, 5, 6, 1, 0, 7])])
def test_capture_keeps_exactly_the_last_window_queries(window, chunks):
    torch.manual_seed(window)
    T = sum(chunks)
    p = Prompt(SHAPE, T, seed=window + T)
    mgr = CompressionManager(SHAPE, num_pages=10, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    mgr.begin_extend(2, "rid", window)
    seen = 0
    for c in chunks:
        for layer in range(SHAPE.num_layers):
            mgr.capture_queries(layer, 2, p.q[layer][seen:seen + c])
        seen += c
        for layer in range(SHAPE.num_layers):
            got = mgr.state(2).queries[layer]
            want = p.q[layer][max(0, seen - window):seen]
            assert torch.equal(got, want), f"after {seen} tokens, layer {layer}: {got.shape[0]} captured"
    # A new extend of the same request keeps the capture; a different rid starts afresh.
    mgr.begin_extend(2, "rid", window)
    assert 0 in mgr.state(2).queries
    mgr.begin_extend(2, "other", window)
    assert not mgr.state(2).queries


@pytest.mark.parametrize("span, chunks, start", [
    ((40, 52), [64], 0),                 # one chunk
    ((40, 52), [10, 33, 1, 20], 0),      # the span split over three chunks
    ((3, 4), [1, 1, 1, 1, 60], 0),       # a one-token span
    ((40, 64), [5, 59], 0),              # the span runs to the prompt's end
    ((40, 52), [20, 4], 40),             # a prefix hit recomputes from the span's start
    ((40, 52), [12, 6], 46),             # a deeper hit: only [46, 52) is computed
])
@pytest.mark.parametrize("policy", ["snapkv", "adakv"])
def test_question_span_capture_and_compression_equal_compress_layer(span, chunks, start, policy):
    """A span capture keeps exactly the span's computed queries, whatever the chunking, and
    compression scores with them at their positions (compress_layer with q_end)."""
    T = 64
    p = Prompt(SHAPE, T, seed=sum(span) + len(chunks) + start)
    cfg = make_cfg(policy, budget=12, window=3)
    mgr = CompressionManager(SHAPE, num_pages=400, page_size=4, dtype=torch.float32, device="cpu", only_if_smaller=False)
    mgr.begin_extend(1, "rid", cfg.obs_window, span=span)
    pos = start
    for c in chunks:
        for layer in range(SHAPE.num_layers):
            mgr.capture_queries(layer, 1, p.q[layer][pos:pos + c], pos=pos)
        pos += c
    assert pos == T
    first = max(span[0], start)
    for layer in range(SHAPE.num_layers):
        assert torch.equal(mgr.state(1).queries[layer], p.q[layer][first:span[1]])
    rec = mgr.compress(1, cfg, T, p.get_kv)
    pol = oracle_policy(cfg, 3)
    planned = pol.plan_budgets(T, cfg.budget, SHAPE.num_layers, SHAPE.num_kv_heads)
    for layer in range(SHAPE.num_layers):
        want = compress_layer(pol, layer, p.q[layer][first:span[1]].transpose(0, 1), p.k[layer].transpose(0, 1),
                              p.v[layer].transpose(0, 1), cfg.budget, planned, q_end=span[1])
        assert torch.equal(rec.layers[layer].lengths.cpu(), want.lengths.cpu()), layer
        k_rows, v_rows = rebuild_rows(mgr, 1, layer)
        torch.testing.assert_close(torch.cat(k_rows), want.k_flat)
        torch.testing.assert_close(torch.cat(v_rows), want.v_flat)
    # a span past the prompt is refused; a span capture without positions is an error
    mgr.begin_extend(2, "r2", 3, span=(10, 70))
    for layer in range(SHAPE.num_layers):
        mgr.capture_queries(layer, 2, p.q[layer], pos=0)
    with pytest.raises(ValueError, match="ends after the 64-token prompt"):
        mgr.compress(2, cfg, T, p.get_kv)
    with pytest.raises(ValueError, match="needs the chunk's start position"):
        mgr.capture_queries(0, 2, p.q[0])
    with pytest.raises(ValueError, match="0 <= start < end"):
        mgr.begin_extend(3, "r3", 3, span=(5, 5))


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv"])
def test_chunked_capture_selects_like_one_chunk(policy):
    """The kept tokens depend on q_win; chunking the prefill must not change them."""
    torch.manual_seed(7)
    T, budget, window = 97, 15, 8
    cfg = make_cfg(policy, budget, window)
    p = Prompt(SHAPE, T, seed=11)
    kept = []
    for chunks in ([T], [45, 45, 3, 4], [90, 1, 1, 1, 1, 1, 1, 1]):
        mgr = CompressionManager(SHAPE, num_pages=500, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
        prefill(mgr, 0, cfg, p, chunks)
        mgr.compress(0, cfg, T, p.get_kv)
        kept.append([rebuild_rows(mgr, 0, layer)[0] for layer in range(SHAPE.num_layers)])
    want = expected_kept(cfg, SHAPE, p, window)
    for run in kept:
        for layer in range(SHAPE.num_layers):
            for h in range(SHAPE.num_kv_heads):
                assert torch.equal(run[layer][h], p.k[layer][want[layer][h], h])


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv", "full", "streamingllm"])
@pytest.mark.parametrize("computed", [1, 3])
def test_prefix_hit_with_fewer_queries_than_window_still_compresses(policy, computed):
    """A radix prefix hit recomputes only the last `computed` tokens: the window shrinks to them."""
    torch.manual_seed(computed)
    T, budget, window = 54, 12, 8
    cfg = make_cfg(policy, budget, window)
    p = Prompt(SHAPE, T, seed=5)
    mgr = CompressionManager(SHAPE, num_pages=300, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    prefill(mgr, 4, cfg, p, start=T - computed)
    rec = mgr.compress(4, cfg, T, p.get_kv)
    # the query policies see a `computed`-query window; full/streamingllm select by position only
    want = expected_kept(cfg, SHAPE, p, window if policy in ("full", "streamingllm") else computed)
    for layer in range(SHAPE.num_layers):
        k_rows, v_rows = rebuild_rows(mgr, 4, layer)
        for h in range(SHAPE.num_kv_heads):
            assert torch.equal(k_rows[h], p.k[layer][want[layer][h], h]), f"layer {layer} head {h}"
            assert (T - 1) in want[layer][h].tolist()
    B = T if policy == "full" else budget
    assert rec.kept_tokens == SHAPE.num_layers * SHAPE.num_kv_heads * B
    mgr.check_integrity()


def test_prefix_hit_does_not_change_a_position_only_policy():
    """StreamingLLM with B < sink + window: the window decides how many sinks fit; a cache hit must not."""
    T, cfg = 54, make_cfg("streamingllm", budget=11, window=8, sink_size=4)
    p = Prompt(SHAPE, T, seed=8)
    kept = []
    for start in (0, T - 1):  # whole prompt computed / prefix hit: only the last token computed
        mgr = CompressionManager(SHAPE, num_pages=300, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
        prefill(mgr, 0, cfg, p, start=start)
        mgr.compress(0, cfg, T, p.get_kv)
        kept.append(rebuild_rows(mgr, 0, 0)[0])
    want = p.k[0][[0, 1, 2, *range(T - 8, T)], 0]  # 3 sinks + the 8-token window
    assert torch.equal(kept[0][0], want)
    assert torch.equal(kept[1][0], want)  # today: 4 sinks + the last 7


def test_compress_without_captured_queries_raises_and_allocates_nothing():
    cfg = make_cfg("snapkv", 8, 4)
    p = Prompt(SHAPE, 20, seed=0)
    mgr = CompressionManager(SHAPE, num_pages=100, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    with pytest.raises(RuntimeError, match="no observation-window queries captured for row 9, layer 0"):
        mgr.compress(9, cfg, 20, p.get_kv)
    assert mgr.allocator.free_pages == 100 and not mgr.records
    mgr.check_integrity()


def test_a_failed_page_write_frees_its_pages_and_the_request_stays_whole(monkeypatch):
    """Pages allocated for a request whose copy fails are given back (before: lost for good,
    check_integrity "untracked"); the serving layer then leaves the request uncompressed."""
    import types

    from headkv_sglang.serving.lifecycle import compress_and_release
    from headkv_sglang.serving.state import ServingState

    cfg = make_cfg("snapkv", 8, 4)
    p = Prompt(SHAPE, 40, seed=2)
    mgr = CompressionManager(SHAPE, num_pages=300, page_size=3, dtype=torch.float32, device="cpu")
    prefill(mgr, 1, cfg, p)
    mgr.compress(1, cfg, 40, p.get_kv)  # another request holds pages
    free_before = mgr.allocator.free_pages
    write = mgr.pool.write
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # layer 2
            raise RuntimeError("injected write failure")
        return write(*args, **kwargs)

    monkeypatch.setattr(mgr.pool, "write", failing_write)
    prefill(mgr, 2, cfg, p)
    with pytest.raises(RuntimeError, match="injected write failure"):
        mgr.compress(2, cfg, 40, p.get_kv)
    assert mgr.allocator.free_pages == free_before and 2 not in mgr.records
    mgr.check_integrity()

    # the serving layer: counted as an error fallback, nothing released, request unchanged
    calls.clear()
    prefill(mgr, 2, cfg, p)
    state = ServingState(cfg, manager=mgr)
    req_to_token = torch.arange(64, dtype=torch.int32).view(1, 64).expand(3, 64).contiguous()
    kv = types.SimpleNamespace(get_key_buffer=lambda layer: p.k[layer].repeat(2, 1, 1),
                               get_value_buffer=lambda layer: p.v[layer].repeat(2, 1, 1))
    freed = []
    tree = types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token),
                                 token_to_kv_pool_allocator=types.SimpleNamespace(get_kvcache=lambda: kv,
                                                                                  free=freed.append))
    req = types.SimpleNamespace(rid="r2", skip_radix_cache_insert=False, lock="held")
    assert compress_and_release(state, req, 2, cfg, 40, tree, mgr) is False
    assert state.fallbacks == {"error": 1} and not freed and req.lock == "held"
    assert mgr.allocator.free_pages == free_before and not mgr.capturing(2)
    mgr.check_integrity()


@pytest.mark.parametrize("T, budget, page_size", [(1, 8, 16), (16, 8, 16), (12, 12, 3), (40, 38, 16)])
def test_a_prompt_whose_pages_would_not_be_smaller_stays_uncompressed(T, budget, page_size):
    """Page rounding gives every (layer, KV head) whole pages: never hold more than the full KV."""
    from headkv_sglang.kv.manager import NotSmallerError

    cfg = make_cfg("snapkv", budget, min(4, budget))
    p = Prompt(SHAPE, T, seed=T)
    mgr = CompressionManager(SHAPE, num_pages=400, page_size=page_size, dtype=torch.float32, device="cpu")
    prefill(mgr, 0, cfg, p)
    with pytest.raises(NotSmallerError):
        mgr.compress(0, cfg, T, p.get_kv)
    assert mgr.allocator.free_pages == 400 and not mgr.records
    mgr.check_integrity()


def test_a_prompt_whose_pages_are_smaller_is_compressed():
    cfg = make_cfg("snapkv", 8, 4)
    p = Prompt(SHAPE, 17, seed=1)  # 17 tokens -> 8 kept = 3 pages of 3 per head: 9 < 17
    mgr = CompressionManager(SHAPE, num_pages=400, page_size=3, dtype=torch.float32, device="cpu")
    prefill(mgr, 0, cfg, p)
    rec = mgr.compress(0, cfg, 17, p.get_kv)
    assert rec.held_bytes(mgr.pool.bytes_per_page) < mgr.full_bytes(17)


# --------------------------------------------------------------------------- #
# ownership
# --------------------------------------------------------------------------- #
def test_free_returns_every_page():
    torch.manual_seed(1)
    mgr = CompressionManager(SHAPE, num_pages=1500, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    rng = random.Random(1)
    rows = []
    for idx, policy in enumerate(POLICIES * 2):
        T = rng.choice([1, 7, 54, 97])
        cfg = make_cfg(policy, budget=rng.randint(6, 30), window=rng.randint(1, 5))
        p = Prompt(SHAPE, T, seed=idx)
        prefill(mgr, idx, cfg, p)
        rec = mgr.compress(idx, cfg, T, p.get_kv)
        assert len(set(rec.page_ids)) == len(rec.page_ids)
        rows.append(idx)
        mgr.check_integrity()
    used = sum(len(r.page_ids) for r in mgr.records.values())
    assert mgr.allocator.used_pages == used
    all_ids = [i for r in mgr.records.values() for i in r.page_ids]
    assert len(set(all_ids)) == len(all_ids), "two requests share a page"
    rng.shuffle(rows)
    for idx in rows:
        assert mgr.free(idx) is True
        assert mgr.free(idx) is False  # second free: nothing held
        mgr.check_integrity()
    assert mgr.allocator.free_pages == mgr.allocator.num_pages
    assert not mgr.records and not any(mgr.capturing(i) for i in range(64))


def test_free_drops_a_pending_capture():
    mgr = CompressionManager(SHAPE, num_pages=10, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    p = Prompt(SHAPE, 9, seed=0)
    prefill(mgr, 3, make_cfg("snapkv", 8, 4), p)
    assert mgr.free(3) is False
    with pytest.raises(RuntimeError, match="no observation-window queries"):
        mgr.compress(3, make_cfg("snapkv", 8, 4), 9, p.get_kv)


@pytest.mark.parametrize("policy", POLICIES)
def test_pool_full_allocates_nothing_and_retry_succeeds(policy):
    torch.manual_seed(2)
    T, cfg = 54, make_cfg(policy, budget=13, window=4)
    p = Prompt(SHAPE, T, seed=2)
    probe = CompressionManager(SHAPE, num_pages=1000, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    prefill(probe, 0, cfg, p)
    need = len(probe.compress(0, cfg, T, p.get_kv).page_ids)

    mgr = CompressionManager(SHAPE, num_pages=need + 4, page_size=3, dtype=torch.float32, device="cpu", only_if_smaller=False)
    blocker = mgr.allocator.allocate(5, owner="blocker")  # leaves need - 1 free
    prefill(mgr, 0, cfg, p)
    with pytest.raises(PoolFullError, match=re.escape(f"request needs {need} pages, {need - 1} free")):
        mgr.compress(0, cfg, T, p.get_kv)
    assert mgr.allocator.free_pages == need - 1 and not mgr.records
    mgr.allocator.check_integrity({"blocker": blocker})
    assert mgr.stats()["policies"] == {}
    # Room made: the same request (capture kept) compresses and fills the pool exactly.
    mgr.allocator.free(blocker, owner="blocker")
    rec = mgr.compress(0, cfg, T, p.get_kv)
    assert len(rec.page_ids) == need and mgr.allocator.free_pages == 4
    mgr.check_integrity()


# --------------------------------------------------------------------------- #
# stats
# --------------------------------------------------------------------------- #
def test_stats_bytes_ratio_and_per_policy_counts():
    torch.manual_seed(3)
    L, H, D = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim
    mgr = CompressionManager(SHAPE, num_pages=900, page_size=3, dtype=torch.float16, device="cpu", only_if_smaller=False)
    bpp = 2 * 3 * D * 2
    reqs = {0: ("snapkv", 97), 1: ("snapkv", 54), 2: ("full", 7), 3: ("streamingllm", 54)}
    for idx, (policy, T) in reqs.items():
        cfg = make_cfg(policy, budget=10, window=4)
        p = Prompt(SHAPE, T, seed=idx, dtype=torch.float16)
        prefill(mgr, idx, cfg, p)
        mgr.compress(idx, cfg, T, p.get_kv)
    st = mgr.stats()
    used = sum(len(r.page_ids) for r in mgr.records.values())
    assert st["pool"] == {"num_pages": 900, "page_size": 3, "free_pages": 900 - used, "used_pages": used,
                          "bytes_per_page": bpp, "capacity_bytes": 900 * bpp}
    assert st["running_compressed_requests"] == 4
    assert set(st["policies"]) == {"snapkv", "full", "streamingllm"}

    def expect(names):
        recs = [mgr.records[i] for i in names]
        held = sum(len(r.page_ids) for r in recs) * bpp
        full = sum(2 * r.prompt_len * L * H * D * 2 for r in recs)
        kept = sum(r.kept_tokens for r in recs)
        return held, full, kept, sum(r.prompt_len * L * H for r in recs)

    for name, members in (("snapkv", [0, 1]), ("full", [2]), ("streamingllm", [3])):
        s = st["policies"][name]
        held, full, kept, prompt = expect(members)
        assert s["compressed_requests_total"] == len(members)
        assert s["running_compressed_requests"] == len(members)
        assert s["held_bytes"] == held
        assert s["full_kv_bytes"] == full
        assert s["ratio"] == pytest.approx(full / held)
        assert s["kept_fraction"] == pytest.approx(kept / prompt)
        assert s["cumulative_kept_fraction"] == pytest.approx(kept / prompt)
        assert s["cumulative_ratio"] == pytest.approx(full / held)
    # snapkv keeps min(B, T) = 10 tokens per head: 4 pages of 3 per row
    assert st["policies"]["snapkv"]["held_bytes"] == 2 * L * H * 4 * bpp
    assert st["policies"]["snapkv"]["kept_fraction"] == pytest.approx(2 * 10 / (97 + 54))

    snap_cum = dict(st["policies"]["snapkv"])
    mgr.free(0)
    st2 = mgr.stats()
    s = st2["policies"]["snapkv"]
    held, full, kept, prompt = expect([1])
    assert s["compressed_requests_total"] == 2 and s["running_compressed_requests"] == 1
    assert (s["held_bytes"], s["full_kv_bytes"]) == (held, full)
    assert s["cumulative_ratio"] == pytest.approx(snap_cum["cumulative_ratio"])
    assert st2["running_compressed_requests"] == 3
    for idx in (1, 2, 3):
        mgr.free(idx)
    st3 = mgr.stats()
    assert st3["pool"]["free_pages"] == 900 and st3["running_compressed_requests"] == 0
    for s in st3["policies"].values():
        assert s["held_bytes"] == 0 and s["ratio"] is None and s["kept_fraction"] is None
        assert s["running_compressed_requests"] == 0 and s["compressed_requests_total"] >= 1


# --------------------------------------------------------------------------- #
# admission bound
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("policy", POLICIES)
def test_pages_upper_bound_covers_actual_pages(policy, page_size):
    rng = random.Random(f"{policy}{page_size}")
    torch.manual_seed(page_size)
    for trial in range(3):
        shape = SHAPE if trial % 2 else SHAPE_G1
        T = rng.choice([1, 7, 54, 97, 301])
        budget = rng.randint(2, 120)
        cfg = make_cfg(policy, budget, window=rng.randint(1, min(budget, 12)))
        p = Prompt(shape, T, seed=trial)
        mgr = CompressionManager(shape, num_pages=5000, page_size=page_size, dtype=torch.float32, device="cpu", only_if_smaller=False)
        prefill(mgr, 0, cfg, p)
        used = len(mgr.compress(0, cfg, T, p.get_kv).page_ids)
        bound = pages_upper_bound(cfg.resolve_scoring(False), shape, T, page_size)  # scored by a question
        msg = f"{policy} T={T} B={budget} w={cfg.obs_window} ps={page_size}: used {used}, bound {bound}"
        assert used <= bound, msg
        rows = shape.num_layers * shape.num_kv_heads
        if policy in ("full", "snapkv", "streamingllm"):  # every row is the same length: exact
            assert used == bound, msg
        else:
            assert bound <= math.ceil(rows * min(budget, T) / page_size) + rows, msg


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_pages_upper_bound_is_exact_for_razor(tmp_path, page_size):
    """Razor's plan is known before prefill, so admission reserves exactly what it uses."""
    from headkv_sglang.profiles import HeadProfile

    rng = random.Random(f"razor{page_size}")
    L, Hq, H = SHAPE.num_layers, SHAPE.num_q_heads, SHAPE.num_kv_heads
    table = lambda: [[rng.random() for _ in range(Hq)] for _ in range(L)]  # noqa: E731
    path = HeadProfile(architecture="", model_name="random", num_layers=L, num_q_heads=Hq, num_kv_heads=H,
                       head_dim=SHAPE.head_dim, method="razor", parameters={}, scores=table(), echo=table(),
                       induction=table()).save(tmp_path / "razor.json", heatmap=False)
    for trial, T in enumerate([1, 7, 54, 97, 301]):
        budget = rng.randint(2, 120)
        cfg = make_cfg("razor", budget, window=rng.randint(1, min(budget, 12)), head_profile=str(path),
                       razor_fraction=rng.choice([0.0, 0.15, 0.5, 1.0]))
        p = Prompt(SHAPE, T, seed=trial)
        mgr = CompressionManager(SHAPE, num_pages=5000, page_size=page_size, dtype=torch.float32, device="cpu", only_if_smaller=False)
        prefill(mgr, 0, cfg, p)
        used = len(mgr.compress(0, cfg, T, p.get_kv).page_ids)
        bound = pages_upper_bound(cfg, SHAPE, T, page_size)
        assert used == bound, f"T={T} B={budget} fraction={cfg.razor_fraction} ps={page_size}: used {used}, bound {bound}"
        # and below the every-head-keeps-T worst case as soon as some head drops tokens
        if cfg.razor_fraction < 1.0 and budget < T:
            assert bound < L * H * math.ceil(T / page_size)
