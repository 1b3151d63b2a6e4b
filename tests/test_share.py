"""Shared compressed prompts (``kv_share``; CompressionManager.publish / pin / adopt / evict).

A request that extends a shared prompt must attend exactly as if it had compressed that
prompt itself (a private copy in a second manager is the reference), must hold no pages of
its own, and the shared pages must go back to the pool only when no row reads them: checked
against the allocator's owner table after every step of random interleavings.

Odd sizes (page size 5, 3 KV heads in GQA groups of 2, 3 layers). No SGLang: a plain tensor
stands in for its token pool.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from headkv_sglang.config import ConfigError, KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries
from headkv_sglang.profiles import HeadProfile
from headkv_sglang.serving.requests import share_key
from ragged_oracle import oracle_row

SHAPE = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=3, head_dim=8)
PS = 5
SLOTS = 400


class Pools:
    """A stand-in token pool (K/V per layer and slot) and request rows on shuffled slots."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        L, H, D = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim
        self.k = torch.randn(L, SLOTS, H, D, generator=self.gen)
        self.v = torch.randn(L, SLOTS, H, D, generator=self.gen)
        self.req_to_token = torch.stack([torch.randperm(SLOTS, generator=self.gen) for _ in range(8)]).to(torch.int32)
        self.queries = [torch.randn(4, SHAPE.num_q_heads, D, generator=self.gen) for _ in range(L)]

    def compress(self, m: CompressionManager, idx: int, cfg: KVPolicyConfig, doc_row: int, n: int):
        """Compress positions [0, n) of row ``doc_row``'s K/V into row ``idx``'s pages."""
        m.begin_extend(idx, f"r{idx}", cfg.obs_window)
        for layer in range(SHAPE.num_layers):
            m.capture_queries(layer, idx, self.queries[layer][-cfg.obs_window:])
        slots = self.req_to_token[doc_row, :n].long()
        return m.compress(idx, cfg, n, lambda layer: (self.k[layer, slots], self.v[layer, slots]))


def config(policy: str, **kw) -> KVPolicyConfig:
    return KVPolicyConfig(policy=policy, budget=11, window=4, kernel_size=3, share=True, **kw).validate()


def profile(tmp_path, method: str) -> str:
    scores = torch.rand(SHAPE.num_layers, SHAPE.num_q_heads, generator=torch.Generator().manual_seed(4))
    prof = HeadProfile(architecture="LlamaForCausalLM", model_name="m", num_layers=SHAPE.num_layers,
                       num_q_heads=SHAPE.num_q_heads, num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                       method=method, parameters={"seed": 4}, scores=scores.tolist(),
                       **({"echo": scores.tolist(), "induction": scores.tolist()} if method == "razor" else {}))
    return str(prof.save(tmp_path / f"{method}.json", heatmap=False))


@pytest.mark.parametrize("policy", ["streamingllm", "snapkv", "adakv", "razor", "pod"])
def test_a_request_reading_a_shared_prompt_attends_as_with_its_own_copy(policy, tmp_path):
    P = Pools(seed=len(policy))
    extra = {}
    if policy in ("razor", "pod"):
        extra = dict(head_profile=profile(tmp_path, policy), **({"razor_fraction": 0.3} if policy == "razor"
                                                               else {"pod_share": 0.5}))
    cfg = config(policy, **extra)
    doc, q_len = 47, 9
    ids = torch.randint(0, 1000, (doc + q_len + 3,), generator=P.gen).tolist()
    shared = CompressionManager(SHAPE, 200, PS, torch.float32, "cpu")
    private = CompressionManager(SHAPE, 200, PS, torch.float32, "cpu")

    # the document's request compresses it and shares it
    P.compress(shared, 1, cfg, doc_row=1, n=doc)
    entry = shared.publish(1, share_key(cfg), ids[:doc])
    assert entry is not None and shared.records[1].page_ids == [] and shared.records[1].shared is entry
    doc_pages = len(entry.record.page_ids)
    assert shared.allocator.used_pages == doc_pages

    # a request whose prompt extends it (its own suffix on its own slots) reads it
    assert shared.find_shared(share_key(cfg), ids[:doc + q_len]) is entry
    shared.pin(3, entry)
    rec = shared.adopt(3, doc + q_len)
    assert (rec.prompt_len, rec.tail_start, rec.page_ids, rec.shared) == (doc, doc, [], entry)
    assert shared.allocator.used_pages == doc_pages  # no page of its own
    shared.check_integrity()

    # the reference: the same document compressed into a private copy for that row
    P.req_to_token[3, :doc] = P.req_to_token[1, :doc]  # the prefix's slots, as a radix hit gives
    P.compress(private, 3, dataclasses.replace(cfg, share=False), doc_row=3, n=doc)
    assert private.allocator.used_pages == doc_pages

    kern_s = TorchRaggedAttention(shared.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
    kern_p = TorchRaggedAttention(private.pool, SHAPE.num_layers, SHAPE.num_kv_heads)
    seq = doc + q_len + 2  # two generated tokens after the question
    kern_s.plan(rows_for_queries([shared.records[3]], P.req_to_token, [3], [doc], [seq]))
    kern_p.plan(rows_for_queries([private.records[3]], P.req_to_token, [3], [doc], [seq]))
    scale = SHAPE.head_dim ** -0.5
    for layer in range(SHAPE.num_layers):
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=P.gen)
        o_s = kern_s.run(layer, q, P.k[layer], P.v[layer], scale)
        o_p = kern_p.run(layer, q, P.k[layer], P.v[layer], scale)
        torch.testing.assert_close(o_s, o_p, rtol=0, atol=0)
        if policy != "pod":  # the naive oracle has no values-only rows (tests/test_pod.py has PoD's)
            slots = P.req_to_token[3, doc:seq].long()
            want = oracle_row(shared.pool, shared.records[3].layers[layer], q[0], P.k[layer, slots],
                              P.v[layer, slots], scale)
            torch.testing.assert_close(o_s[0], want, rtol=1e-5, atol=1e-5)

    # the first request leaving does not free what the second reads; the second leaving
    # leaves the prompt as idle cache, freed on demand
    shared.free(1)
    shared.check_integrity()
    assert entry.refs == {3} and shared.evictable_pages() == 0
    shared.free(3)
    shared.check_integrity()
    assert entry.refs == set() and shared.evictable_pages() == doc_pages
    assert shared.clear_shared() == doc_pages and shared.allocator.free_pages == 200
    shared.check_integrity()


def test_lookup_takes_the_longest_shared_prefix_under_the_same_config():
    P = Pools(seed=5)
    cfg = config("streamingllm")
    m = CompressionManager(SHAPE, 300, PS, torch.float32, "cpu")
    ids = torch.randint(0, 1000, (90,), generator=P.gen).tolist()
    P.compress(m, 1, cfg, 1, 40)
    short = m.publish(1, share_key(cfg), ids[:40])
    P.compress(m, 2, cfg, 1, 70)
    long = m.publish(2, share_key(cfg), ids[:70])
    assert m.find_shared(share_key(cfg), ids) is long
    assert m.find_shared(share_key(cfg), ids[:70]) is long  # a prompt equal to it
    assert m.find_shared(share_key(cfg), ids[:69]) is short
    other = ids[:50] + [ids[50] + 1] + ids[51:]
    assert m.find_shared(share_key(cfg), other) is short  # diverges after 50 tokens
    assert m.find_shared(share_key(cfg), [ids[0] + 1] + ids[1:]) is None
    assert m.find_shared(share_key(config("streamingllm", sink_size=2)), ids) is None  # other settings
    # the same prompt compressed twice (two requests at once): the second keeps its own pages
    P.compress(m, 3, cfg, 1, 40)
    own = len(m.records[3].page_ids)
    assert m.publish(3, share_key(cfg), ids[:40]) is None and len(m.records[3].page_ids) == own > 0
    with pytest.raises(ValueError, match="tokens given"):
        m.publish(3, share_key(cfg), ids[:41])
    # a ratio budget shares by its ratio: prompts of other lengths resolve other budgets
    r = KVPolicyConfig(policy="streamingllm", budget_ratio=0.2, share=True).validate()
    assert share_key(r.for_prompt(100)) == share_key(r.for_prompt(5000)) != share_key(cfg)
    m.check_integrity()


def test_refcounts_and_eviction_under_random_interleavings():
    """Rows publish, pin, adopt and leave in random order on a small pool; a compression that
    needs pages evicts idle shared prompts, least recently used first, never one that a row
    reads or is pinned to. The owner table is checked after every step."""
    rnd = random.Random(7)
    P = Pools(seed=7)
    cfg = config("streamingllm")
    m = CompressionManager(SHAPE, 60, PS, torch.float32, "cpu")
    docs = [torch.randint(0, 1000, (30 + 7 * i,), generator=P.gen).tolist() for i in range(4)]
    live: dict[int, object] = {}  # row -> the entry it reads (None: its own pages)
    evicted_seen = 0
    for step in range(300):
        free_rows = [i for i in range(8) if i not in live and m.pinned(i) is None]
        op = rnd.random()
        if op < 0.4 and free_rows:
            idx, doc = rnd.choice(free_rows), rnd.choice(docs)
            entry = m.find_shared(share_key(cfg), doc + [1, 2, 3])
            if entry is not None and rnd.random() < 0.8:
                m.pin(idx, entry)
                if rnd.random() < 0.2:  # aborted before its prefill ended
                    m.free(idx)
                else:
                    live[idx] = m.adopt(idx, len(doc) + 3).shared
            else:
                before = m.shared_totals["evicted"]
                try:
                    P.compress(m, idx, cfg, 1, len(doc))
                except Exception as e:  # the pool is full of pages that rows read
                    assert "pages" in str(e)
                    m.drop_capture(idx)
                    continue
                evicted_seen += m.shared_totals["evicted"] - before
                e = m.publish(idx, share_key(cfg), doc)
                live[idx] = e
        elif live:
            idx = rnd.choice(sorted(live))
            m.free(idx)
            del live[idx]
        m.check_integrity()
        for e in m.shared_prefixes():  # a read prompt is never gone
            assert e.refs == {i for i, x in live.items() if x is e} | {i for i in range(8) if m.pinned(i) is e}
        for idx, e in live.items():
            if e is not None:
                assert m.records[idx].shared is e and e in m.shared_prefixes()
    assert evicted_seen > 0 and m.shared_totals["adopted"] > 20
    for idx in list(live):
        m.free(idx)
    m.clear_shared()
    m.check_integrity()
    assert m.allocator.free_pages == 60


def test_eviction_is_least_recently_used_and_spares_pinned_prompts():
    P = Pools(seed=11)
    cfg = config("streamingllm")
    m = CompressionManager(SHAPE, 90, PS, torch.float32, "cpu")
    ids = [torch.randint(0, 1000, (35,), generator=P.gen).tolist() for _ in range(3)]
    entries = []
    for i in range(3):
        P.compress(m, i, cfg, 1, 35)
        entries.append(m.publish(i, share_key(cfg), ids[i]))
    per = len(entries[0].record.page_ids)
    assert m.allocator.free_pages == 90 - 3 * per
    m.free(1), m.free(0), m.free(2)  # idle in the order 1, 0, 2
    m.pin(5, entries[1])  # the oldest idle one is wanted again
    assert m.evict_shared(m.allocator.free_pages + per) == per
    assert m.shared_prefixes() == [entries[1], entries[2]]  # entry 0 went, not the pinned 1
    with pytest.raises(ValueError, match="read by rows"):
        m.drop_shared(entries[1])
    with pytest.raises(ValueError, match="not shared any more"):
        m.pin(6, entries[0])
    m.free(5)
    assert m.evict_shared(10 ** 6) == 2 * per and m.shared_prefixes() == []
    m.check_integrity()
    st = m.stats()["shared"]
    assert (st["published_total"], st["evicted_total"], st["prefixes"], st["pages"]) == (3, 3, 0, 0)


def test_share_config_rules():
    assert KVPolicyConfig().share is False
    cfg = KVPolicyConfig(policy="snapkv").with_request({"kv_share": True})
    assert cfg.share is True
    with pytest.raises(ConfigError, match=r"custom_params.kv_share: invalid value 1; expected bool"):
        KVPolicyConfig(policy="snapkv").with_request({"kv_share": 1})
    with pytest.raises(ConfigError, match="custom_params.kv_decode_budget.*do not combine"):
        KVPolicyConfig(policy="snapkv", share=True).with_request({"kv_decode_budget": 64})
    with pytest.raises(ConfigError, match="custom_params.kv_share.*do not combine"):
        KVPolicyConfig(policy="snapkv", decode_budget=64).with_request({"kv_share": True})
    with pytest.raises(ConfigError, match="--kv-share"):
        KVPolicyConfig(policy="snapkv", share=True, decode_budget=8).validate()


def test_a_tensor_parallel_rank_never_shares():
    from headkv_sglang.policies.sharding import HeadShard

    P = Pools(seed=3)
    cfg = config("streamingllm")
    m = CompressionManager(SHAPE, 100, PS, torch.float32, "cpu", shard=HeadShard(tp_rank=0, tp_size=3))
    ids = list(range(40))
    m.begin_extend(1, "r", cfg.obs_window)
    slots = P.req_to_token[1, :40].long()
    m.compress(1, cfg, 40, lambda layer: (P.k[layer, slots, :1], P.v[layer, slots, :1]))
    assert m.publish(1, share_key(cfg), ids) is None and m.find_shared(share_key(cfg), ids) is None
