"""PoD (policies/pod.py, values-only pages, the torch kernel's shared distant keys) against
naive references: a brute-force sharing map, per-(layer, head) loops over the kept
positions, and dense attention where a sharing row's distant logits are its own queries
against its layer group's first layer's keys (``pod_sharing: keys``) or that layer's
queries against them (``scores``).

Odd sizes: page size 5 (values-only pages hold 10 tokens), 3 KV heads in GQA groups of 2,
5 layers, groups of 2, 3 and 5 layers, prompts of 41-97 tokens, extend batches with several
rows per request, both sharing kinds in one batch.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.pool import values_only_addresses
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries
from headkv_sglang.policies import PoD
from headkv_sglang.policies.pod import sharing_map
from headkv_sglang.profiles import HeadProfile

SHAPE = ModelShape(num_layers=5, num_q_heads=6, num_kv_heads=3, head_dim=8)
PS = 5
SCALE = SHAPE.head_dim ** -0.5


# ----------------------------------------------------------------------------- sharing map
def naive_sharing(sim: torch.Tensor, share: float, group: int = 2, threshold: float = 0.0) -> set[tuple[int, int]]:
    """Walk the candidates best first (with a threshold: those at least that similar, all of
    them); take one when the run of the head's sharing rows it joins, plus the row below that
    run, stays at most ``group`` layers."""
    L, H = sim.shape
    cands = sorted(((l, h) for l in range(1, L) for h in range(H) if threshold <= 0 or float(sim[l, h]) >= threshold),
                   key=lambda c: (-float(sim[c]), c[0], c[1]))
    target = len(cands) if threshold > 0 else round(share * L * H)
    taken: set[tuple[int, int]] = set()
    for l, h in cands:
        if len(taken) == target:
            break
        run = {l} | {x for x in range(L) if all((y, h) in taken for y in range(min(x, l), max(x, l) + 1) if y != l)}
        if len(run) + 1 <= group:
            taken.add((l, h))
    return taken


def group_source(sharing: torch.Tensor, layer: int, h: int) -> int:
    """The layer that stores the distant keys a sharing row reads: the first below its run."""
    s = layer
    while sharing[s, h]:
        s -= 1
    return s


@pytest.mark.parametrize("L,H,share,group,seed", [(7, 3, 0.3, 2, 0), (2, 1, 0.5, 2, 1), (9, 2, 0.5, 2, 2),
                                                  (5, 4, 0.0, 2, 3), (30, 3, 0.1, 2, 4), (1, 3, 0.5, 2, 5),
                                                  (9, 2, 0.9, 3, 6), (13, 3, 0.7, 4, 7), (6, 2, 0.95, 6, 8),
                                                  (30, 3, 0.5, 3, 9)])
def test_sharing_map_equals_the_naive_walk(L, H, share, group, seed):
    sim = torch.rand(L, H, generator=torch.Generator().manual_seed(seed))
    if L > 3:
        sim[2, 0] = sim[3, 0] = 0.5  # a tie: the lower layer first
    got = sharing_map(sim, share, group)
    assert {tuple(x) for x in got.nonzero().tolist()} == naive_sharing(sim, share, group)
    assert not bool(got[0].any())  # layer 0 has no layer below
    for h in range(H):  # every group (a run of sharing rows and its source below) fits
        for l in range(1, L):
            if got[l, h] and (l + 1 == L or not got[l + 1, h]):
                assert l - group_source(got, l, h) + 1 <= group
    if group == 2:
        assert not bool((got[1:] & got[:-1]).any())  # pairs: a source is never itself sharing
    with pytest.raises(ValueError, match="at least 2"):
        sharing_map(sim, share, 1)


@pytest.mark.parametrize("L,H,threshold,group,seed", [(9, 3, 0.5, 1024, 0), (13, 2, 0.3, 3, 1), (5, 4, 0.99, 2, 2),
                                                      (30, 3, 0.7, 1024, 3)])
def test_a_threshold_takes_every_row_that_alike(L, H, threshold, group, seed):
    """The paper's blocks: with a threshold every row at least that similar to the layer below
    shares (as many as the group bound allows); without a bound exactly those rows."""
    sim = torch.rand(L, H, generator=torch.Generator().manual_seed(seed))
    got = sharing_map(sim, 0.0, group, threshold)
    assert {tuple(x) for x in got.nonzero().tolist()} == naive_sharing(sim, 0.0, group, threshold)
    if group >= L:
        want = sim >= threshold
        want[0] = False
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- a compressed prompt
def pod_profile(tmp_path, seed: int = 3) -> str:
    scores = torch.rand(SHAPE.num_layers, SHAPE.num_q_heads, generator=torch.Generator().manual_seed(seed))
    prof = HeadProfile(architecture="LlamaForCausalLM", model_name="m", num_layers=SHAPE.num_layers,
                       num_q_heads=SHAPE.num_q_heads, num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                       method="pod", parameters={"seed": seed}, scores=scores.tolist())
    return str(prof.save(tmp_path / "pod.json", heatmap=False))


class Served:
    """Requests compressed with PoD over a stand-in token pool (``[slots, H, D]`` per layer)."""

    def __init__(self, tmp_path, budget: int, share: float, lengths: list[int], seed: int = 0,
                 num_pages: int = 2000, group: int = 2, sharing: str | list[str] = "keys"):
        self.gen = torch.Generator().manual_seed(seed)
        L, H, D = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim
        kinds = [sharing] * len(lengths) if isinstance(sharing, str) else sharing
        self.cfgs = [KVPolicyConfig(policy="pod", budget=budget, window=4, kernel_size=3, sink_size=3,
                                    pod_share=share, pod_group=group, pod_sharing=kind,
                                    head_profile=pod_profile(tmp_path)).validate() for kind in kinds]
        self.cfg = self.cfgs[0]
        self.m = CompressionManager(SHAPE, num_pages, PS, torch.float32, "cpu")
        slots = 2000
        self.k = torch.randn(L, slots, H, D, generator=self.gen)
        self.v = torch.randn(L, slots, H, D, generator=self.gen)
        self.req_to_token = torch.zeros(len(lengths), slots, dtype=torch.int32)
        self.lengths = lengths
        self.keep: dict[int, list[torch.Tensor]] = {}  # row -> per layer bool [H, T], from the policy
        perm = torch.randperm(slots, generator=self.gen).to(torch.int32)
        for idx, T in enumerate(lengths):
            self.req_to_token[idx] = perm.roll(300 * idx)
            self.m.begin_extend(idx, f"r{idx}", self.cfg.obs_window)
            for layer in range(L):
                self.m.capture_queries(layer, idx, torch.randn(self.cfg.obs_window, SHAPE.num_q_heads, D,
                                                                generator=self.gen))
            rec = self.m.compress(idx, self.cfgs[idx], T, self.kv_of(idx, 0, T))
            assert rec.prompt_len == T

    def kv_of(self, idx, start, end):
        slots = self.req_to_token[idx, start:end].long()
        return lambda layer: (self.k[layer, slots], self.v[layer, slots])

    @property
    def policy(self) -> PoD:
        from headkv_sglang.policies.registry import build_policy

        return build_policy(self.cfg, SHAPE)


def kept_positions(s: Served, idx: int) -> list[list[tuple[list[int], list[int]]]]:
    """Per layer and head: (whole positions, values-only positions) as the pages say, from the
    stored keys and values compared with the pool's (each random vector is unique)."""
    rec = s.m.records[idx]
    T = rec.prompt_len
    slots = s.req_to_token[idx, :T].long()
    out = []
    kflat, vflat = s.m.pool.k_pages.view(-1, SHAPE.head_dim), s.m.pool.v_pages.view(-1, SHAPE.head_dim)
    for layer, lp in enumerate(rec.layers):
        rows = []
        for h in range(SHAPE.num_kv_heads):
            pages = lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])]
            n = int(lp.lengths[h])
            keys = s.m.pool.k_pages[pages].reshape(-1, SHAPE.head_dim)[:n]
            vals = s.m.pool.v_pages[pages].reshape(-1, SHAPE.head_dim)[:n]
            ref_k, ref_v = s.k[layer, slots, h], s.v[layer, slots, h]
            whole = [int((ref_k == x).all(1).nonzero()[0]) for x in keys]
            assert all(torch.equal(ref_v[p], vals[i]) for i, p in enumerate(whole)), "a value is not its key's"
            vo = []
            if lp.vo_lengths is not None and int(lp.vo_lengths[h]):
                nv = int(lp.vo_lengths[h])
                addr, in_v = values_only_addresses(lp.vo_indices, torch.full((nv,), int(lp.vo_indptr[h])),
                                                   torch.arange(nv), PS)
                got = torch.where(in_v[:, None], vflat[addr], kflat[addr])
                vo = [int((ref_v == x).all(1).nonzero()[0]) for x in got]
            rows.append((whole, vo))
        out.append(rows)
    return out


@pytest.mark.parametrize("budget,share,group,lengths,seed", [(17, 0.3, 2, [97, 41], 0), (11, 0.5, 2, [63], 1),
                                                             (1000, 0.5, 2, [58, 77], 2), (23, 0.0, 2, [71], 3),
                                                             (19, 0.7, 3, [83, 44], 4), (1000, 0.8, 5, [61], 5)])
def test_pages_hold_the_selection_and_sharing_rows_hold_values_only(tmp_path, budget, share, group, lengths, seed):
    """Every row keeps min(B, T) tokens as SnapKV with sinks; a sharing row keeps its group's
    first row's, storing its distant ones (sinks <= position < T - window) as values only, in
    values-only pages (two pages' worth each); the pages are exactly that many."""
    s = Served(tmp_path, budget, share, lengths, seed=seed, group=group)
    sharing = s.policy.sharing_rows
    assert int(sharing.sum()) == len(naive_sharing(s.policy.similarity, share, group))
    if group > 2:
        assert bool((sharing[1:] & sharing[:-1]).any())  # the case has groups of more than two layers
    total_pages = 0
    for idx, T in enumerate(lengths):
        rows = kept_positions(s, idx)
        w = min(s.cfg.obs_window, budget, T)
        rec = s.m.records[idx]
        for layer in range(SHAPE.num_layers):
            for h in range(SHAPE.num_kv_heads):
                whole, vo = rows[layer][h]
                kept = sorted(whole + vo)
                assert whole == sorted(whole) and vo == sorted(vo) and len(set(kept)) == len(kept)
                assert len(kept) == min(budget, T)
                assert set(range(T - w, T)) <= set(whole)  # the window: whole
                assert set(range(min(3, min(budget, T) - w))) <= set(whole)  # the sinks that fit: whole
                if sharing[layer, h]:
                    below_whole, below_vo = rows[layer - 1][h]
                    assert kept == sorted(below_whole + below_vo)  # the same tokens as its source
                    assert vo == [p for p in kept if 3 <= p < T - w]
                    if sharing[layer - 1, h]:  # a longer group: the row below's values-only tokens
                        assert below_vo == vo and int(rec.layers[layer].vo_start[h]) == -1
                    else:
                        assert not below_vo
                        assert int(rec.layers[layer].vo_start[h]) == sum(p < 3 for p in below_whole)
                else:
                    assert vo == []
                n_whole, n_vo = len(whole), len(vo)
                total_pages += math.ceil(n_whole / PS) + math.ceil(n_vo / (2 * PS))
        assert rec.kept_tokens == SHAPE.num_layers * SHAPE.num_kv_heads * min(budget, T)
        assert len(rec.page_ids) <= s.policy.max_pages(T, budget, SHAPE.num_layers, SHAPE.num_kv_heads, PS)
    s.m.check_integrity()
    assert s.m.allocator.used_pages == total_pages
    for idx in range(len(lengths)):
        assert s.m.free(idx)
    assert s.m.allocator.free_pages == s.m.allocator.num_pages


def naive_pod_attention(s: Served, idx: int, rows, layer: int, qs: list[torch.Tensor], tail: list[int],
                        sharing: torch.Tensor, kind: str):
    """``[Hq, D]`` for one query row at ``layer``: ``qs[l]`` is its ``[Hq, D]`` query at layer l.
    A sharing head's distant logits are against its group's first layer's keys, with this
    layer's query (``kind == "keys"``) or that layer's (``"scores"``)."""
    G = SHAPE.num_q_heads // SHAPE.num_kv_heads
    slots = s.req_to_token[idx].long()
    out = torch.zeros(SHAPE.num_q_heads, SHAPE.head_dim)
    for h in range(SHAPE.num_kv_heads):
        whole, vo = rows[layer][h]
        own = whole + tail
        src = group_source(sharing, layer, h)
        for g in range(G):
            qh = h * G + g
            logits = [float(qs[layer][qh] @ s.k[layer, slots[p], h]) * SCALE for p in own]
            q_vo = qs[layer][qh] if kind == "keys" else qs[src][qh]
            logits += [float(q_vo @ s.k[src, slots[p], h]) * SCALE for p in vo]
            vals = torch.stack([s.v[layer, slots[p], h] for p in own + vo])
            out[qh] = torch.softmax(torch.tensor(logits), 0) @ vals
    return out


@pytest.mark.parametrize("budget,share,group,lengths,tails,sharing,seed", [
    (17, 0.3, 2, [97, 41], [[0], [5, 2]], "scores", 0),  # request 1 has 2 extend rows seeing 5 and 2 decoded
    (17, 0.3, 2, [97, 41], [[0], [5, 2]], "keys", 0),
    (1000, 0.5, 2, [58], [[3, 0, 1]], "keys", 1),  # pure PoD (nothing dropped), 3 rows of one request
    (13, 0.5, 2, [61, 88, 45], [[7], [0], [2]], ["keys", "scores", "keys"], 2),  # both kinds in one batch
    (19, 0.7, 3, [83, 44], [[4], [0, 3]], ["scores", "keys"], 3),  # groups of 3 layers
    (1000, 0.8, 5, [61, 52], [[2], [1]], ["keys", "scores"], 4),  # one group of all 5 layers per head
])
def test_kernel_equals_naive_pod_attention(tmp_path, budget, share, group, lengths, tails, sharing, seed):
    """The torch kernel over the pages + each row's tail, layer by layer in one forward, equals
    dense attention in which sharing heads take their distant keys from their group's first
    layer."""
    s = Served(tmp_path, budget, share, lengths, seed=seed, group=group, sharing=sharing)
    kinds = [sharing] * len(lengths) if isinstance(sharing, str) else sharing
    records, idxs, starts, ends = [], [], [], []
    for idx, row_tails in enumerate(tails):
        for n in row_tails:  # several rows of one request: an extend batch's query tokens
            records.append(s.m.records[idx])
            idxs.append(idx)
            starts.append(lengths[idx])
            ends.append(lengths[idx] + n)
    kernel = TorchRaggedAttention(s.m.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
    kernel.plan(rows_for_queries(records, s.req_to_token, idxs, starts, ends))
    R = len(records)
    qs = [torch.randn(R, SHAPE.num_q_heads, SHAPE.head_dim, generator=s.gen) for _ in range(SHAPE.num_layers)]
    kept = {idx: kept_positions(s, idx) for idx in set(idxs)}
    rows_sharing = s.policy.sharing_rows
    assert bool(rows_sharing.any()) == (share > 0)
    if group > 2:
        assert bool((rows_sharing[1:] & rows_sharing[:-1]).any())
    for layer in range(SHAPE.num_layers):
        out = kernel.run(layer, qs[layer], s.k[layer], s.v[layer], SCALE)
        for r in range(R):
            tail = list(range(starts[r], ends[r]))
            want = naive_pod_attention(s, idxs[r], kept[idxs[r]], layer, [q[r] for q in qs], tail, rows_sharing,
                                       kinds[idxs[r]])
            torch.testing.assert_close(out[r], want, rtol=1e-5, atol=1e-5)


def test_a_sharing_layer_without_the_layer_below_in_this_forward_is_an_error(tmp_path):
    s = Served(tmp_path, 17, 0.5, [97])
    first = int(s.policy.sharing_rows.any(dim=1).nonzero()[0])
    kernel = TorchRaggedAttention(s.m.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
    kernel.plan(rows_for_queries([s.m.records[0]], s.req_to_token, [0], [97], [97]))
    q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim)
    with pytest.raises(RuntimeError, match=f"layer {first} shares layer {first - 1}"):
        kernel.run(first, q, s.k[first], s.v[first], SCALE)


def test_pod_holds_less_than_snapkv_at_the_same_budget(tmp_path):
    """The memory PoD saves: the distant keys of its sharing rows (values-only pages)."""
    pod = Served(tmp_path, 40, 0.5, [97])
    snap = CompressionManager(SHAPE, 2000, PS, torch.float32, "cpu")
    cfg = KVPolicyConfig(policy="snapkv", budget=40, window=4, kernel_size=3).validate()
    snap.begin_extend(0, "r", 4)
    for layer in range(SHAPE.num_layers):
        snap.capture_queries(layer, 0, torch.randn(4, SHAPE.num_q_heads, SHAPE.head_dim))
    snap.compress(0, cfg, 97, pod.kv_of(0, 0, 97))
    n_share = int(pod.policy.sharing_rows.sum())
    # a sharing row: 3 sinks + 4 window whole (2 pages), 33 distant values-only (4 pages), not 8 pages
    assert snap.allocator.used_pages == SHAPE.num_layers * SHAPE.num_kv_heads * 8
    assert pod.m.allocator.used_pages == snap.allocator.used_pages - n_share * (8 - 6)


def test_decode_compression_keeps_the_values_only_pages(tmp_path):
    """A decode budget on a PoD request grows its whole pages; the values-only ones stay, and
    the kernel still reads them."""
    s = Served(tmp_path, 17, 0.5, [97])
    cfg = KVPolicyConfig(policy="pod", budget=17, window=4, kernel_size=3, sink_size=3, pod_share=0.5,
                         head_profile=s.cfg.head_profile, decode_budget=6).validate()
    s.m.free(0)
    s.m.begin_extend(0, "r0", cfg.obs_window)
    for layer in range(SHAPE.num_layers):
        s.m.capture_queries(layer, 0, torch.randn(cfg.obs_window, SHAPE.num_q_heads, SHAPE.head_dim))
    rec = s.m.compress(0, cfg, 97, s.kv_of(0, 0, 97))
    before = kept_positions(s, 0)
    seq = 97
    moves = 0
    while moves < 2:
        seq += 1
        for layer in range(SHAPE.num_layers):
            s.m.capture_decode_query(layer, 0, torch.randn(SHAPE.num_q_heads, SHAPE.head_dim))
        due = s.m.decode_due(0, seq)
        if due is not None:
            assert s.m.compress_decode(0, *due, s.kv_of(0, *due), SCALE) is not None
            s.m.take_moved()
            moves += 1
    rec = s.m.records[0]
    for layer, lp in enumerate(rec.layers):
        for h in range(SHAPE.num_kv_heads):
            assert int(lp.lengths[h]) == len(before[layer][h][0]) + rec.decode_kept
            if lp.vo_lengths is not None:
                assert int(lp.vo_lengths[h]) == len(before[layer][h][1])
    kernel = TorchRaggedAttention(s.m.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
    kernel.plan(rows_for_queries([rec], s.req_to_token, [0], [rec.tail_start], [seq]))
    for layer in range(SHAPE.num_layers):
        out = kernel.run(layer, torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim), s.k[layer], s.v[layer], SCALE)
        assert torch.isfinite(out).all()
    s.m.check_integrity()
    assert s.m.free(0) and s.m.allocator.free_pages == s.m.allocator.num_pages


# ----------------------------------------------------------------------------- config
def test_pod_config_and_policy_validation(tmp_path):
    assert KVPolicyConfig(policy="pod").with_request({"kv_pod_share": 0.4}).pod_share == 0.4
    assert KVPolicyConfig(policy="pod").with_request({"kv_pod_share": 0}).pod_share == 0.0
    cfg = KVPolicyConfig(policy="pod").with_request({"kv_pod_group": 4, "kv_pod_sharing": "keys",
                                                     "kv_pod_threshold": 0.5})
    assert (cfg.pod_group, cfg.pod_sharing, cfg.pod_threshold) == (4, "keys", 0.5)
    assert (KVPolicyConfig(policy="pod").pod_group, KVPolicyConfig(policy="pod").pod_sharing) == (2, "scores")
    for key, bad in [("kv_pod_share", 0.96), ("kv_pod_share", -0.1), ("kv_pod_share", "half"),
                     ("kv_pod_share", True), ("kv_pod_group", 1), ("kv_pod_group", 2.5),
                     ("kv_pod_sharing", "values"), ("kv_pod_sharing", 1), ("kv_pod_threshold", 1.5),
                     ("kv_pod_threshold", -0.1)]:
        with pytest.raises(ConfigError, match=f"custom_params.{key}: invalid value"):
            KVPolicyConfig(policy="pod").with_request({key: bad})
    with pytest.raises(ConfigError, match="sink"):
        KVPolicyConfig(policy="pod", budget=4, sink_size=4).validate()
    with pytest.raises(ValueError, match="share"):
        PoD(similarity=torch.zeros(3, 2), share=0.97)
    with pytest.raises(ValueError, match="group"):
        PoD(similarity=torch.zeros(3, 2), share=0.5, group=1)
    with pytest.raises(ValueError, match="sharing"):
        PoD(similarity=torch.zeros(3, 2), share=0.5, sharing="logits")
    with pytest.raises(ValueError, match="threshold"):
        PoD(similarity=torch.zeros(3, 2), share=0.5, threshold=2.0)
    with pytest.raises(ValueError, match="similarity"):
        PoD(similarity=torch.zeros(3))
    pol = PoD(similarity=torch.zeros(3, 2), share=0.5)
    with pytest.raises(ValueError, match="num_layers=4"):
        pol.check_model(4, 2)


def test_pod_is_refused_on_a_flashinfer_server(monkeypatch):
    from headkv_sglang import plugin

    cfg = KVPolicyConfig(policy="pod")
    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "0")
    monkeypatch.delenv("HEADKV_SGLANG_RAGGED_KERNEL", raising=False)
    assert "no FlashInfer kernel" in plugin.pod_kernel_error(cfg, "--kv-policy")
    assert plugin.pod_kernel_error(KVPolicyConfig(policy="snapkv"), "--kv-policy") is None
    monkeypatch.setenv("HEADKV_SGLANG_RAGGED_KERNEL", "torch")
    assert plugin.pod_kernel_error(cfg, "--kv-policy") is None
    monkeypatch.setenv("HEADKV_SGLANG_CPU_AUTO", "1")
    monkeypatch.delenv("HEADKV_SGLANG_RAGGED_KERNEL")
    assert plugin.pod_kernel_error(cfg, "--kv-policy") is None


# ----------------------------------------------------------------------------- profiler statistic
def test_distant_overlap_equals_a_naive_loop():
    from headkv_sglang.profile import distant_overlap

    g = torch.Generator().manual_seed(4)
    H, Q, S, sink, window = 3, 5, 29, 2, 6
    a = torch.softmax(torch.randn(H, Q, S, generator=g), -1)
    b = torch.softmax(torch.randn(H, Q, S, generator=g), -1)
    got = distant_overlap(a, b, sink, window)
    want = torch.zeros(H, dtype=torch.float64)
    for h, q in itertools.product(range(H), range(Q)):
        pa = a[h, q, sink:S - window].double()
        pb = b[h, q, sink:S - window].double()
        pa, pb = pa / pa.sum(), pb / pb.sum()
        want[h] += sum(min(x, y) for x, y in zip(pa.tolist(), pb.tolist())) / Q
    torch.testing.assert_close(got, want)
    assert torch.allclose(distant_overlap(a, a, sink, window), torch.ones(H, dtype=torch.float64))
    with pytest.raises(ValueError, match="no distant"):
        distant_overlap(a, b, 20, 9)
