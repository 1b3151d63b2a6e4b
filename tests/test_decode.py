"""Decode-phase compression (policies/decode.py, CompressionManager.compress_decode) against
naive references: per-head loops for the ranking, a per-(layer, head) model of which
generated positions are kept, and dense attention over exactly those tokens.

Odd sizes throughout (page size 5, 3 KV heads in GQA groups of 2, AdaKV's ragged prompt
rows that end in partial pages). No SGLang: a plain tensor stands in for its token pool.
"""

from __future__ import annotations

import math

import pytest
import torch

from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager, NotSmallerError
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries
from headkv_sglang.policies.decode import decode_chunk, decode_scores, select_decode
from headkv_sglang.profiles import HeadProfile

SHAPE = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=3, head_dim=8)
PS = 5
SCALE = SHAPE.head_dim ** -0.5


# ----------------------------------------------------------------------------- ranking
def test_decode_scores_match_a_per_head_loop():
    gen = torch.Generator().manual_seed(1)
    H, G, w, n, D = 3, 2, 4, 11, 8
    q = torch.randn(H * G, w, D, generator=gen)
    k = torch.randn(H, n, D, generator=gen)
    got = decode_scores(q, k, 0.3)
    want = torch.zeros(H, n)
    for h in range(H):
        for g in range(G):
            for i in range(w):
                logits = torch.tensor([float(q[h * G + g, i] @ k[h, j]) * 0.3 for j in range(n)])
                want[h] += torch.softmax(logits, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(decode_scores(q[:0], k, 0.3, recency=True), torch.arange(n).float().expand(H, n))
    with pytest.raises(ValueError, match="do not group"):
        decode_scores(torch.randn(4, w, D), k, 0.3)


def test_select_decode_keeps_the_best_in_position_order_ties_to_the_older():
    scores = torch.tensor([[1.0, 5.0, 5.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert select_decode(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert select_decode(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert select_decode(scores, 0).shape == (2, 0)
    with pytest.raises(ValueError):
        select_decode(scores, 6)


# ----------------------------------------------------------------------------- a request
class Request:
    """One compressed request decoding over a stand-in token pool, with a naive model of
    what each (layer, KV head) must hold."""

    def __init__(self, policy: str, decode_budget: int, prompt_len: int = 57, num_pages: int = 400,
                 budget: int = 12, seed: int = 0, shared: bool = False, **cfg):
        self.gen = torch.Generator().manual_seed(seed)
        if shared:  # one memory: the pages live in token slots borrowed from a stand-in token allocator
            from test_shared_memory import make_store

            _, alloc, pool = make_store(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, PS, 500, seed)
            self.m = CompressionManager(SHAPE, 0, 0, torch.float32, "cpu", pool=pool, allocator=alloc)
        else:
            self.m = CompressionManager(SHAPE, num_pages, PS, torch.float32, "cpu")
        self.cfg = KVPolicyConfig(policy=policy, budget=budget, window=3, kernel_size=3,
                                  decode_budget=decode_budget, **cfg).validate()
        slots = 600
        L, H, D = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim
        self.k = torch.randn(L, slots, H, D, generator=self.gen)
        self.v = torch.randn(L, slots, H, D, generator=self.gen)
        # a row's positions sit on shuffled slots, as in SGLang's pool
        self.req_to_token = torch.zeros(4, slots, dtype=torch.int32)
        self.req_to_token[2] = torch.randperm(slots, generator=self.gen).to(torch.int32)
        self.idx, self.seq_len = 2, prompt_len
        self.m.begin_extend(self.idx, "r", self.cfg.obs_window)
        for layer in range(L):
            self.m.capture_queries(layer, self.idx, torch.randn(self.cfg.obs_window, SHAPE.num_q_heads, D,
                                                                generator=self.gen))
        rec = self.m.compress(self.idx, self.cfg, prompt_len, self.get_kv(0, prompt_len))
        # the prompt's kept tokens per (layer, head), as written: they must never change
        self.prompt = [[self._row(rec, layer, h)[:int(rec.layers[layer].lengths[h])].clone() for h in range(H)]
                       for layer in range(L)]
        self.prompt_v = [[self._row(rec, layer, h, "v")[:int(rec.layers[layer].lengths[h])].clone()
                          for h in range(H)] for layer in range(L)]
        self.kept: list[list[list[int]]] = [[[] for _ in range(H)] for _ in range(L)]  # generated positions
        # their keys and values as the pages must hold them (the pool's, or D2O's merges of them)
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            [(torch.zeros(0, D), torch.zeros(0, D)) for _ in range(H)] for _ in range(L)]
        self.thresholds: list[float | None] = [None] * L
        self.merged = 0
        self.queries: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.moves = 0

    def get_kv(self, start, end):
        slots = self.req_to_token[self.idx, start:end].long()
        return lambda layer: (self.k[layer, slots], self.v[layer, slots])

    def _row(self, rec, layer, h, kind="k"):
        lp = rec.layers[layer]
        pages = lp.kv_indices[int(lp.kv_indptr[h]):int(lp.kv_indptr[h + 1])]
        pool = self.m.pool
        src = pool.k_flat if kind == "k" else pool.v_flat
        return src[pool.page_tokens(pages)].reshape(-1, SHAPE.head_dim)

    def step(self) -> None:
        """One decode step: the newest token (position seq_len) is in the pool, its queries
        are captured, and what is due moves into the pages."""
        self.seq_len += 1
        for layer in range(SHAPE.num_layers):
            q = torch.randn(SHAPE.num_q_heads, SHAPE.head_dim, generator=self.gen)
            self.queries[layer].append(q)
            self.m.capture_decode_query(layer, self.idx, q)
        due = self.m.decode_due(self.idx, self.seq_len)
        if due is None:
            return
        start, end = due
        rec = self.m.compress_decode(self.idx, start, end, self.get_kv(start, end), SCALE)
        if rec is None:
            return
        self.moves += 1
        self.m.take_moved()  # what the serving layer does with its slots
        slots = self.req_to_token[self.idx, start:end].long()
        for layer in range(SHAPE.num_layers):
            dropped = []  # D2O: (head, candidate, best cosine, its best kept candidate)
            chosen = []
            for h in range(SHAPE.num_kv_heads):
                cands = self.kept[layer][h] + list(range(start, end))
                keys = torch.cat([self.kv[layer][h][0], self.k[layer, slots, h]])
                vals = torch.cat([self.kv[layer][h][1], self.v[layer, slots, h]])
                keep = min(self.cfg.decode_budget, len(cands))
                order = list(range(len(cands)))
                if keep < len(cands):
                    if self.cfg.policy == "streamingllm":
                        scores = [float(i) for i in range(len(cands))]
                    else:
                        scores = self.ref_scores(layer, h, keys)
                    order = sorted(sorted(range(len(cands)), key=lambda i: (-scores[i], i))[:keep])
                    for i in set(range(len(cands))) - set(order):
                        sims = [float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0)) for j in order]
                        best = max(sims)
                        dropped.append((h, i, best, sims.index(best)))
                chosen.append((cands, keys, vals, order))
            merge = self.cfg.policy == "d2o" and self.cfg.d2o_merge == "on" and dropped
            if merge:
                mean = sum(d[2] for d in dropped) / len(dropped)
                prev = self.thresholds[layer]
                self.thresholds[layer] = threshold = mean if prev is None else 0.5 * prev + 0.5 * mean
            for h, (cands, keys, vals, order) in enumerate(chosen):
                new_k, new_v = keys[order].clone(), vals[order].clone()
                if merge:  # the paper's weights: e for the kept token, e^s for each merged one
                    weight = torch.full((len(order),), math.e)
                    new_k, new_v = new_k * math.e, new_v * math.e
                    for dh, i, best, j in dropped:
                        if dh == h and best >= threshold:
                            new_k[j] += math.exp(best) * keys[i]
                            new_v[j] += math.exp(best) * vals[i]
                            weight[j] += math.exp(best)
                            self.merged += 1
                    new_k, new_v = new_k / weight[:, None], new_v / weight[:, None]
                self.kept[layer][h] = [cands[i] for i in order]
                self.kv[layer][h] = (new_k, new_v)

    def ref_scores(self, layer, h, keys) -> list[float]:
        G = SHAPE.num_q_heads // SHAPE.num_kv_heads
        recent = self.queries[layer][-self.cfg.obs_window:]
        total = torch.zeros(keys.shape[0])
        for q in recent:
            for g in range(G):
                total += torch.softmax((keys @ q[h * G + g]) * SCALE, 0)
        return total.tolist()

    def check(self) -> None:
        rec = self.m.records[self.idx]
        L, H = SHAPE.num_layers, SHAPE.num_kv_heads
        n_dec = len(self.kept[0][0])
        assert rec.decode_kept == n_dec and all(len(self.kept[lay][h]) == n_dec for lay in range(L) for h in range(H))
        for layer in range(L):
            lp = rec.layers[layer]
            for h in range(H):
                p = len(self.prompt[layer][h])
                assert int(lp.lengths[h]) == p + n_dec
                assert int(lp.kv_indptr[h + 1] - lp.kv_indptr[h]) == math.ceil((p + n_dec) / PS)
                row_k, row_v = self._row(rec, layer, h), self._row(rec, layer, h, "v")
                assert torch.equal(row_k[:p], self.prompt[layer][h]), "the prompt's tokens changed"
                assert torch.equal(row_v[:p], self.prompt_v[layer][h])
                torch.testing.assert_close(row_k[p:p + n_dec], self.kv[layer][h][0], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(row_v[p:p + n_dec], self.kv[layer][h][1], rtol=1e-5, atol=1e-6)
                if not self.merged:  # nothing merged: the pages hold the pool's values exactly
                    slots = self.req_to_token[self.idx, self.kept[layer][h]].long()
                    assert torch.equal(row_k[p:p + n_dec], self.k[layer, slots, h])
        self.m.check_integrity()
        assert rec.decode_pages <= self.m.decode_pages_bound(self.cfg.decode_budget)
        assert self.m.decode_pages_pending() == self.m.decode_pages_bound(self.cfg.decode_budget) - rec.decode_pages

    def check_attention(self) -> None:
        """The ragged kernel over the new record and the remaining tail = dense attention over
        the prompt's kept tokens, the kept generated positions and the tail."""
        rec = self.m.records[self.idx]
        kernel = TorchRaggedAttention(self.m.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
        kernel.plan(rows_for_queries([rec], self.req_to_token, [self.idx], [rec.tail_start], [self.seq_len]))
        G, D = SHAPE.num_q_heads // SHAPE.num_kv_heads, SHAPE.head_dim
        tail = list(range(rec.tail_start, self.seq_len))
        for layer in range(SHAPE.num_layers):
            q = torch.randn(1, SHAPE.num_q_heads, D, generator=self.gen)
            out = kernel.run(layer, q, self.k[layer], self.v[layer], SCALE)  # SGLang's buffers: [slots, H, D]
            for h in range(SHAPE.num_kv_heads):
                slots = self.req_to_token[self.idx, tail].long()
                keys = torch.cat([self.prompt[layer][h], self.kv[layer][h][0], self.k[layer, slots, h]])
                vals = torch.cat([self.prompt_v[layer][h], self.kv[layer][h][1], self.v[layer, slots, h]])
                for g in range(G):
                    want = torch.softmax(keys @ q[0, h * G + g] * SCALE, 0) @ vals
                    torch.testing.assert_close(out[0, h * G + g], want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def d2o_profile(tmp_path) -> str:
    """A D2O density profile of SHAPE's made-up model (random per-head variances)."""
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(SHAPE.num_layers, SHAPE.num_q_heads, generator=gen).tolist()
    prof = HeadProfile(architecture="LlamaForCausalLM", model_name="m", num_layers=SHAPE.num_layers,
                       num_q_heads=SHAPE.num_q_heads, num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                       method="d2o", parameters={"seed": 7}, scores=scores)
    return str(prof.save(tmp_path / "d2o.json", heatmap=False))


@pytest.mark.parametrize("policy,decode_budget,seed,shared", [
    ("adakv", 9, 1, False), ("snapkv", 23, 2, False), ("pyramidkv", 1, 3, False), ("adakv", 40, 4, False),
    ("streamingllm", 11, 5, False), ("d2o", 13, 6, False), ("d2o-off", 7, 8, False),
    ("snapkv", 23, 2, True), ("d2o", 13, 6, True)])  # shared: the pages inside borrowed token slots
def test_generated_tokens_move_into_pages_and_the_best_stay(policy, decode_budget, seed, shared, d2o_profile):
    """D2O (merge on): the generated tokens each move drops merge into their most similar
    kept one, with the layer's moving-average threshold (naive loops over every dropped
    token in the reference model); d2o-off: plain eviction, the pool's values exactly."""
    extra = {}
    if policy.startswith("d2o"):
        extra = dict(head_profile=d2o_profile, sink_size=2, d2o_merge="off" if policy == "d2o-off" else "on")
        policy = "d2o"
    r = Request(policy, decode_budget, seed=seed, shared=shared, **extra)
    window, chunk = r.cfg.obs_window, decode_chunk(decode_budget)
    tail_max = 0
    for _ in range(130):
        r.step()
        rec = r.m.records[r.idx]
        tail_max = max(tail_max, r.seq_len - rec.tail_start)
        if r.moves:
            r.check()
    assert r.moves >= 3  # the budget filled, then selection among old and new
    assert tail_max <= window + chunk  # the tail never outgrows its window plus a chunk
    r.check_attention()
    # all of it comes back with the row
    assert r.m.free(r.idx) and r.m.allocator.used_pages == 0
    if shared:  # every borrowed slot is back in the token allocator
        assert r.m.allocator.borrowed_chunks == 0 and r.m.allocator.source.available_size() == 500
    else:
        assert r.m.allocator.free_pages == r.m.allocator.num_pages
    assert not any(st.decode_q for st in r.m.states())
    t = r.m.decode_totals
    assert t["compressions"] == r.moves and t["pool_full"] == 0 and t["errors"] == 0
    assert t["head_tokens_merged"] == r.merged
    if extra.get("d2o_merge") == "on":
        assert r.merged > 0 and all(x is not None for x in r.thresholds)
    else:
        assert r.merged == 0


@pytest.mark.parametrize("prompt_len", [4, 11])
def test_a_short_prompt_with_a_decode_budget_is_kept_whole_and_its_output_moves(prompt_len):
    """A prompt whose pages would not be smaller than its full KV (shorter than a page, or
    than the budget) stays whole without a decode budget; with one it is compressed keeping
    every token, so that a long output (a chain of thought) moves into pages."""
    with pytest.raises(NotSmallerError):
        Request("snapkv", 0, prompt_len=prompt_len)
    r = Request("snapkv", 13, prompt_len=prompt_len, seed=prompt_len)
    rec = r.m.records[r.idx]
    assert all(int(n) == prompt_len for lp in rec.layers for n in lp.lengths)
    for _ in range(90):
        r.step()
        if r.moves:
            r.check()
    assert r.moves >= 3
    r.check_attention()
    assert r.m.free(r.idx) and r.m.allocator.free_pages == r.m.allocator.num_pages


def test_no_decode_budget_leaves_the_tail_whole():
    r = Request("snapkv", 0)
    for _ in range(60):
        r.step()
    rec = r.m.records[r.idx]
    assert r.moves == 0 and rec.tail_start == rec.prompt_len and not any(st.decode_q for st in r.m.states())


def test_a_full_pool_leaves_the_request_unchanged_and_retries_a_chunk_later():
    probe = Request("snapkv", 30)
    prompt_pages = len(probe.m.records[probe.idx].page_ids)
    r = Request("snapkv", 30, num_pages=prompt_pages + 1)  # room for the prompt only
    before = r.m.records[r.idx]
    for _ in range(60):
        r.step()
    assert r.moves == 0 and r.m.records[r.idx] is before and before.tail_start == before.prompt_len
    assert r.m.decode_totals["pool_full"] >= 1 and before.decode_retry_at > before.prompt_len
    # a retry waits for another chunk, not every step
    assert r.m.decode_totals["pool_full"] <= 60 // decode_chunk(30) + 1
    r.m.check_integrity()


def test_admission_bounds_include_the_decode_budget():
    m = CompressionManager(SHAPE, 500, PS, torch.float32, "cpu")
    cfg = KVPolicyConfig(policy="snapkv", budget=12, window=3).validate()
    with_decode = KVPolicyConfig(policy="snapkv", budget=12, window=3, decode_budget=11).validate()
    per_row = math.ceil(11 / PS)
    assert m.pages_bound(with_decode, 200) - m.pages_bound(cfg, 200) == SHAPE.num_layers * SHAPE.num_kv_heads * per_row
    assert m.decode_pages_bound(0) == 0


def test_decode_budget_is_validated():
    assert KVPolicyConfig(policy="snapkv", decode_budget=64).validate().decode_budget == 64
    with pytest.raises(ConfigError, match=r"--kv-decode-budget: invalid value -1"):
        KVPolicyConfig(policy="snapkv", decode_budget=-1).validate()
    with pytest.raises(ConfigError, match="not supported with razor"):
        KVPolicyConfig(policy="razor", decode_budget=8).validate()
    # a request asking for razor on a server with a decode budget: the request's key is named
    server = KVPolicyConfig(policy="snapkv", decode_budget=8).validate()
    with pytest.raises(ConfigError, match=r"custom_params.kv_policy: invalid value 'razor'; razor does not support"):
        server.with_request({"kv_policy": "razor"})
    assert server.with_request({"kv_policy": "razor", "kv_decode_budget": 0}).decode_budget == 0
    assert server.with_request({"kv_decode_budget": 3}).decode_budget == 3
