"""One KV memory (kv/shared_memory.py): pages inside token slots borrowed from a token allocator.

* Random sequences of the operations the server does (SGLang requests taking and freeing
  slots — admission, finish, radix eviction; compressing a prompt; decode moves growing a
  request's pages; finish/abort/retraction freeing them; publishing a shared prompt) against
  a naive model (sets): after every step no byte is owned twice (slots vs pages, checked
  with the geometry written out by hand *and* by writing each owner's mark into its bytes
  and reading every mark back), the borrowed chunks are exactly those holding a page,
  and a chunk's slots are back in the token allocator the moment it empties.
* The ragged torch kernel reading pages from the shared buffers gives the outputs of the
  same records in the separate pool (bit for bit), the tails in the same buffers.
* Page writes (whole and values-only) land where the separate pool puts them.
"""

from __future__ import annotations

import random

import pytest
import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.pool import LayerPages, PoolFullError, RaggedHeadKVPool, RequestPages
from headkv_sglang.kv.ragged import TorchRaggedAttention, rows_for_queries
from headkv_sglang.kv.shared_memory import (BorrowingPageAllocator, SharedPagePool, SlotGeometry, layer_buffers,
                                            min_chunk_slots)
from ragged_oracle import random_request


class FakeTokenAllocator:
    """SGLang's token allocator as the store sees it: slots ``1 .. size`` (0 is padding),
    handed out in a shuffled order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.free_slots = list(range(1, size + 1))
        random.Random(seed).shuffle(self.free_slots)
        self.calls = 0

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need_size: int):
        self.calls += 1
        if need_size > len(self.free_slots):
            return None
        out, self.free_slots = self.free_slots[:need_size], self.free_slots[need_size:]
        return torch.tensor(out, dtype=torch.int64)

    def free(self, free_index) -> None:
        got = free_index.tolist()
        assert not set(got) & set(self.free_slots), "slots freed twice"
        self.free_slots += got


def make_store(L, H, D, ps, size, seed, chunk_at_least=1, dtype=torch.float32):
    src = FakeTokenAllocator(size, seed)
    geo = SlotGeometry.smallest(L, H, ps, rows=size + 1, at_least=chunk_at_least)
    alloc = BorrowingPageAllocator(src, geo, max_chunks=size // geo.chunk_slots)
    k_all, v_all, _, _ = layer_buffers(L, size + 1, H, D, dtype, "cpu")
    return src, alloc, SharedPagePool(k_all, v_all, alloc)


def naive_address(geo: SlotGeometry, chunk_slots: dict[int, list[int]], P: int, page: int, t: int) -> int:
    """The row of k_all.view(-1, D) of token t of page ``page``, written out step by step."""
    chunk, j = divmod(page, P)
    u = j * geo.page_size + t
    i, r = divmod(u, geo.num_layers * geo.num_kv_heads)
    layer, head = divmod(r, geo.num_kv_heads)
    slot = chunk_slots[chunk][i]
    # layer_buffers: [layers, 2 (K, V), rows, Hkv] head-vectors
    return ((layer * 2 * geo.rows) + slot) * geo.num_kv_heads + head


def test_geometry_packs_whole_pages():
    for L, H, ps in [(30, 3, 16), (32, 8, 16), (7, 5, 6), (1, 1, 1), (3, 2, 64)]:
        c = min_chunk_slots(L, H, ps)
        g = SlotGeometry(L, H, ps, c, rows=10)
        assert g.pages_per_chunk * ps == c * L * H
        assert all(k * L * H % ps for k in range(1, c)), "a smaller chunk would do"
    with pytest.raises(ValueError, match="multiple of 8"):
        SlotGeometry(30, 3, 16, 4, rows=10)


def test_physical_matches_the_geometry_written_out():
    L, H, D, ps = 5, 3, 4, 7
    src, alloc, pool = make_store(L, H, D, ps, size=300, seed=1)
    ids = alloc.allocate(3 * alloc.pages_per_chunk - 2, owner="a")
    chunks = {c: alloc.chunk_slots[c].tolist() for c in range(alloc.max_chunks) if alloc.chunk_live[c]}
    got = pool.page_tokens(torch.tensor(ids))
    want = torch.tensor([[naive_address(alloc.geometry, chunks, alloc.pages_per_chunk, p, t) for t in range(ps)]
                         for p in ids])
    assert torch.equal(got, want)
    # every head-vector of the borrowed slots once, and no other (the last chunk's 2 free pages aside)
    flat = pool.page_tokens(torch.arange(alloc.num_pages)[alloc._owner >= -1]).flatten()
    assert torch.bincount(flat).max() == 1
    slots = torch.tensor(sorted(s for c in chunks.values() for s in c))
    covered = sorted(set((flat // H % (2 * (300 + 1))).tolist()))
    assert max(covered) <= 300, "a K page address in the V half"
    assert covered == slots.tolist()
    assert flat.numel() == slots.numel() * L * H


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_no_byte_owned_twice(seed):
    rng = random.Random(seed)
    L, H, D = rng.choice([(3, 3, 2), (5, 2, 3), (2, 1, 2)])
    ps = rng.choice([1, 3, 4, 16])
    size = rng.choice([97, 211])
    src, alloc, pool = make_store(L, H, D, ps, size, seed, chunk_at_least=rng.choice([1, 3]))
    geo, P, rows = alloc.geometry, alloc.pages_per_chunk, size + 1
    pages: dict[object, list[int]] = {}  # owner -> its pages (requests 0.., shared prompts "s..")
    sglang: dict[int, list[int]] = {}  # SGLang's holders (running requests, radix tree) -> slots
    next_holder = 0

    def check():
        owned = {w: p for w, p in pages.items() if p}
        alloc.check_integrity(owned)
        held = [s for ss in sglang.values() for s in ss]
        borrowed = alloc.chunk_slots[alloc.chunk_live].flatten().tolist()
        # every slot exactly once: free in the token allocator, SGLang's, or a borrowed chunk's
        assert sorted(src.free_slots + held + borrowed) == list(range(1, size + 1))
        # the borrowed chunks are exactly those holding a page (emptied ones went back)
        want_live = sorted({p // P for ps_ in pages.values() for p in ps_})
        assert alloc.chunk_live.nonzero().flatten().tolist() == want_live
        assert alloc.used_pages == sum(len(p) for p in pages.values())
        assert alloc.free_pages == alloc.free_in_chunks + (len(src.free_slots) // geo.chunk_slots) * P
        # bytes: each owner's mark written into its bytes, then every mark read back
        k = pool.k_all
        k.zero_()
        for who, ss in sglang.items():
            k[:, ss] = 1 + who
        marks = {}
        for n, (who, ps_) in enumerate(owned.items()):
            marks[who] = -1.0 - n
            pool.k_flat[pool.page_tokens(torch.tensor(ps_)).flatten()] = marks[who]
        for who, ss in sglang.items():
            assert bool((k[:, ss] == 1 + who).all()), f"SGLang holder {who}'s slots overwritten by pages"
        for who, ps_ in owned.items():
            addr = pool.page_tokens(torch.tensor(ps_)).flatten()
            assert bool((pool.k_flat[addr] == marks[who]).all()), f"pages of {who!r} overwritten"
            assert set((addr // H % (2 * rows)).tolist()) <= set(borrowed), f"pages of {who!r} outside borrowed slots"
        # V: the same addresses in the V half of the same allocation
        v = pool.v_all
        v.zero_()
        for who, ps_ in owned.items():
            pool.v_flat[pool.page_tokens(torch.tensor(ps_)).flatten()] = marks[who]
        for who, ss in sglang.items():
            assert bool((v[:, ss] == 0).all()) and bool((k[:, ss] == 1 + who).all()), \
                f"SGLang holder {who}'s slots overwritten by V pages"
        for who, ps_ in owned.items():
            addr = pool.page_tokens(torch.tensor(ps_)).flatten()
            assert bool((pool.v_flat[addr] == marks[who]).all()) and bool((pool.k_flat[addr] == marks[who]).all())

    for step in range(160):
        op = rng.choice(["sg_alloc", "sg_alloc", "sg_free", "compress", "compress", "grow", "release",
                         "publish"])
        if op == "sg_alloc":  # admission / a decode step / radix insert
            n = rng.randint(1, 25)
            got = src.alloc(n)
            if got is not None:
                sglang[next_holder] = got.tolist()
                next_holder += 1
        elif op == "sg_free" and sglang:  # finish, retraction of an uncompressed request, radix eviction
            src.free(torch.tensor(sglang.pop(rng.choice(list(sglang)))))
        elif op in ("compress", "grow"):  # a prompt's pages / a decode move adding pages to a request
            reqs = [w for w in pages if isinstance(w, int)]
            who = rng.choice(reqs) if op == "grow" and reqs else step
            n = rng.randint(1, 3 * P)
            before = (alloc.free_pages, alloc.borrowed_chunks, list(src.free_slots))
            try:
                ids = alloc.allocate(n, owner=who)
            except PoolFullError:
                assert n > before[0], f"refused {n} pages with {before[0]} free"
                assert (alloc.free_pages, alloc.borrowed_chunks, src.free_slots) == before, "a refusal changed state"
            else:
                assert n <= before[0] and len(ids) == n
                pages.setdefault(who, []).extend(ids)
        elif op == "release" and pages:  # finish / abort / retraction of a compressed request
            who = rng.choice(list(pages))
            ids = pages.pop(who)
            if rng.random() < 0.3 and len(ids) > 1:  # a failed decode move frees only its new pages
                keep = rng.randint(1, len(ids) - 1)
                alloc.free(ids[keep:], owner=who)
                pages[who] = ids[:keep]
            else:
                alloc.free(ids, owner=who)
        elif op == "publish":
            reqs = [w for w in pages if isinstance(w, int)]
            if reqs:
                who = rng.choice(reqs)
                alloc.transfer(pages[who], who, f"s{who}")
                pages[f"s{who}"] = pages.pop(who)
        check()
    # everything freed: every slot is back in the token allocator
    for who in list(pages):
        alloc.free(pages.pop(who), owner=who)
    for who in list(sglang):
        src.free(torch.tensor(sglang.pop(who)))
    check()
    assert alloc.borrowed_chunks == 0 and src.available_size() == size
    assert alloc.totals["borrowed_chunks"] == alloc.totals["returned_chunks"] > 0


def test_refusal_and_wrong_owner_change_nothing():
    src, alloc, pool = make_store(3, 3, 2, 4, size=40, seed=3)  # chunk 4 slots = 9 pages, 10 chunks
    ids = alloc.allocate(20, owner=1)  # 3 chunks
    src.alloc(20)  # SGLang's requests: 8 slots (2 chunks) left
    snap = (alloc._owner.clone(), alloc.chunk_slots.clone(), list(src.free_slots))
    assert alloc.free_pages == 7 + 2 * 9
    with pytest.raises(PoolFullError, match="chunks allowed"):
        alloc.allocate(200, owner=2)
    with pytest.raises(PoolFullError, match="token allocator has 8 free slots, 12 needed"):
        alloc.allocate(7 + 2 * 9 + 1, owner=2)
    with pytest.raises(AssertionError, match="owned by 1"):
        alloc.free(ids[:3], owner=2)
    with pytest.raises(AssertionError, match="owned by None"):
        alloc.free([alloc.num_pages - 1], owner=1)  # a page of a chunk not borrowed
    assert torch.equal(alloc._owner, snap[0]) and torch.equal(alloc.chunk_slots, snap[1])
    assert src.free_slots == snap[2]
    alloc.check_integrity({1: ids})
    with pytest.raises(AssertionError, match="disagree"):
        alloc.check_integrity({1: ids[:-1]})
    with pytest.raises(AssertionError):
        alloc.check_integrity({1: ids, 2: [ids[0]]})
    more = alloc.allocate(7 + 2 * 9, owner=2)  # exactly what free_pages promised
    assert src.available_size() == 0 and alloc.free_pages == 0
    alloc.check_integrity({1: ids, 2: more})


def test_fullest_chunks_are_taken_first():
    src, alloc, _ = make_store(3, 4, 2, 4, size=64, seed=5)  # 1 slot = 3 pages
    a = alloc.allocate(9, owner="a")  # 3 chunks
    alloc.free([a[0], a[4]], owner="a")  # chunk 0 and 1 have one free page each
    b = alloc.allocate(2, owner="b")
    assert sorted(b) == sorted([a[0], a[4]]), "free pages of borrowed chunks before a new chunk"
    assert alloc.borrowed_chunks == 3
    alloc.free(a[6:9], owner="a")  # a whole chunk empties: back to SGLang at once
    assert alloc.borrowed_chunks == 2 and src.available_size() == 64 - 2


def _shared_copy(split: RaggedHeadKVPool, records: list[RequestPages], alloc, pool) -> list[RequestPages]:
    """The records with their pages moved into the shared pool (contents copied)."""
    old = [p for rec in records for p in rec.page_ids]
    new = alloc.allocate(len(old), owner="copy")
    remap = torch.full((split.num_pages,), -1, dtype=torch.int64)
    remap[torch.tensor(old)] = torch.tensor(new)
    pool.k_flat[pool.page_tokens(torch.tensor(new)).flatten()] = split.k_pages[old].reshape(-1, split.head_dim)
    pool.v_flat[pool.page_tokens(torch.tensor(new)).flatten()] = split.v_pages[old].reshape(-1, split.head_dim)
    out = []
    for rec in records:
        layers = []
        for lp in rec.layers:
            n = LayerPages(kv_indptr=lp.kv_indptr, kv_indices=remap[lp.kv_indices], lengths=lp.lengths,
                           comp_k=lp.comp_k, comp_v=lp.comp_v, comp_count=lp.comp_count)
            n._page_size = split.page_size
            layers.append(n)
        out.append(RequestPages(prompt_len=rec.prompt_len, policy=rec.policy, budget=0, layers=layers,
                                page_ids=remap[torch.tensor(rec.page_ids)].tolist()))
    return out


@pytest.mark.parametrize("page_size,group", [(1, 3), (5, 1), (16, 4)])
def test_ragged_kernel_reads_shared_buffers_like_the_separate_pool(page_size, group):
    gen = torch.Generator().manual_seed(page_size * 10 + group)
    L, H, D, R = 3, 3, 24, 5
    split = RaggedHeadKVPool(3000, page_size, D, torch.float32, "cpu")
    split.k_pages.normal_(generator=gen)
    split.v_pages.normal_(generator=gen)
    free = torch.randperm(3000, generator=gen).tolist()
    size = 1500
    src, alloc, pool = make_store(L, H, D, page_size, size, seed=page_size)
    pool.k_all.normal_(generator=gen)
    pool.v_all.normal_(generator=gen)
    records, idxs, starts, ends = [], [], [], []
    req_to_token = torch.zeros(R, 200, dtype=torch.int32)
    for r in range(R):
        prompt_len = int(torch.randint(1, 97, (1,), generator=gen))
        seq_len = prompt_len + int(torch.randint(1, 40, (1,), generator=gen))
        req_to_token[r, :seq_len] = src.alloc(seq_len).to(torch.int32)  # SGLang's slots in the same buffers
        rec = random_request(split, free, L, H, prompt_len, gen, comp=r % 2 == 1)
        for pos in range(max(prompt_len, seq_len - 2), seq_len):
            records.append(rec)
            idxs.append(r)
            starts.append(prompt_len)
            ends.append(pos + 1)
    distinct = list({id(r): r for r in records}.values())
    moved = dict(zip(map(id, distinct), _shared_copy(split, distinct, alloc, pool)))
    shared_records = [moved[id(r)] for r in records]
    alloc.check_integrity({"copy": [p for r in moved.values() for p in r.page_ids]})
    a, b = TorchRaggedAttention(split, L, H), TorchRaggedAttention(pool, L, H)
    a.plan(rows_for_queries(records, req_to_token, idxs, starts, ends))
    b.plan(rows_for_queries(shared_records, req_to_token, idxs, starts, ends))
    for layer in range(L):
        q = torch.randn(len(records), H * group, D, generator=gen)
        k_buf, v_buf = pool.k_all[layer], pool.v_all[layer]
        torch.testing.assert_close(b.run(layer, q, k_buf, v_buf, D ** -0.5), a.run(layer, q, k_buf, v_buf, D ** -0.5),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("page_size", [1, 3, 8])
def test_writes_land_where_the_separate_pool_puts_them(page_size):
    gen = torch.Generator().manual_seed(page_size)
    H, D = 5, 6
    lengths = torch.tensor([0, 7, 1, 13, 4])
    npages = (lengths + page_size - 1) // page_size
    indptr = torch.zeros(H + 1, dtype=torch.int64)
    torch.cumsum(npages, 0, out=indptr[1:])
    tok = torch.zeros(H + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=tok[1:])
    k, v = torch.randn(int(tok[-1]), D, generator=gen), torch.randn(int(tok[-1]), D, generator=gen)
    split = RaggedHeadKVPool(200, page_size, D, torch.float32, "cpu")
    split.k_pages.normal_(generator=gen)  # stale contents: unused slots must be zeroed
    src, alloc, pool = make_store(4, H, D, page_size, 300, seed=page_size)
    pool.k_all.normal_(generator=gen)
    n = int(npages.sum())
    a = torch.randperm(200, generator=gen)[:n]
    b = torch.tensor(alloc.allocate(n, owner=0))
    split.write(a, indptr, lengths, k, v, tok)
    pool.write(b, indptr, lengths, k, v, tok)
    assert torch.equal(pool.k_flat[pool.page_tokens(b)], split.k_pages[a])
    assert torch.equal(pool.v_flat[pool.page_tokens(b)], split.v_pages[a])
    vo_pages = (lengths + 2 * page_size - 1) // (2 * page_size)
    vo_indptr = torch.zeros(H + 1, dtype=torch.int64)
    torch.cumsum(vo_pages, 0, out=vo_indptr[1:])
    m = int(vo_pages.sum())
    a2 = torch.randperm(200, generator=gen)[:m]
    b2 = torch.tensor(alloc.allocate(m, owner=1))
    split.write_values(a2, vo_indptr, lengths, v, tok)
    pool.write_values(b2, vo_indptr, lengths, v, tok)
    assert torch.equal(pool.k_flat[pool.page_tokens(b2)], split.k_pages[a2])
    assert torch.equal(pool.v_flat[pool.page_tokens(b2)], split.v_pages[a2])


def test_manager_compresses_into_shared_memory_like_the_separate_pool():
    """The whole path: CompressionManager compresses a prompt into pages inside borrowed
    slots, the kernel reads them; same outputs as the manager over the separate pool;
    freeing the request returns every slot."""
    shape = ModelShape(num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=8)
    cfg = KVPolicyConfig(policy="snapkv", budget=11, window=5).validate()
    gen = torch.Generator().manual_seed(7)
    T = 53
    q = [torch.randn(T, 6, 8, generator=gen) for _ in range(3)]
    k = [torch.randn(T, 2, 8, generator=gen) for _ in range(3)]
    v = [torch.randn(T, 2, 8, generator=gen) for _ in range(3)]
    src, alloc, pool = make_store(3, 2, 8, 4, size=120, seed=2)
    mgrs = [CompressionManager(shape, 300, 4, torch.float32, "cpu", only_if_smaller=False),
            CompressionManager(shape, 0, 0, torch.float32, "cpu", only_if_smaller=False, pool=pool, allocator=alloc)]
    tail = src.alloc(3)
    outs = []
    for mgr in mgrs:
        mgr.begin_extend(0, "r", window=5)
        for layer in range(3):
            mgr.capture_queries(layer, 0, q[layer])
        mgr.compress(0, cfg, T, lambda layer: (k[layer], v[layer]))
        mgr.check_integrity()
        kern = TorchRaggedAttention(mgr.pool, 3, 2)
        req_to_token = torch.zeros(1, T + 3, dtype=torch.int32)
        req_to_token[0, T:] = tail.to(torch.int32)
        kern.plan(rows_for_queries([mgr.records[0]], req_to_token, [0], [T], [T + 3]))
        qd = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(1))
        outs.append([kern.run(layer, qd, pool.k_all[layer], pool.v_all[layer], 8 ** -0.5) for layer in range(3)])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert alloc.borrowed_chunks > 0
    mgrs[1].free(0)
    mgrs[1].check_integrity()
    src.free(tail)
    assert alloc.borrowed_chunks == 0 and src.available_size() == 120


class _Ranks:
    """``n`` tensor-parallel ranks as threads: ``agree_min(rank)`` is a real all-reduce (min)
    among them, ``run(fn)`` runs ``fn(rank)`` on every rank at once and returns the results."""

    def __init__(self, n: int) -> None:
        import threading

        self.n, self.vals, self.barrier = n, [0] * n, threading.Barrier(n, timeout=30)
        self.calls = [0] * n

    def agree_min(self, rank: int):
        def call(x):  # an int, or a tuple of ints (each one's minimum)
            self.calls[rank] += 1
            self.vals[rank] = x
            self.barrier.wait()
            out = tuple(min(v) for v in zip(*self.vals)) if isinstance(x, tuple) else min(self.vals)
            self.barrier.wait()
            return out
        return call

    def run(self, fn) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.n) as ex:
            futures = [ex.submit(fn, r) for r in range(self.n)]
            return [f.result(timeout=60) for f in futures]


@pytest.mark.parametrize("seed", range(4))
def test_lockstep_ranks_borrow_and_give_back_alike(seed):
    """--kv-memory shared under --tp: every rank stores other pages (its own heads' counts), yet
    after every operation each rank's token allocator has as many free slots (SGLang's
    replicated schedulers decide on them), no byte is owned twice on any rank, and settling
    at the end gives every chunk back."""
    from headkv_sglang.kv.ranks import RankVote, borrow_together

    rng = random.Random(seed)
    R, L, H, D = 3, 2, 1, 2
    ps = rng.choice([1, 4, 16])
    size = 211
    ranks = _Ranks(R)
    stores = []
    geo = SlotGeometry.smallest(L, H, ps, rows=size + 1, at_least=rng.choice([1, 3]))  # every rank's
    for r in range(R):
        src = FakeTokenAllocator(size, seed * 10 + r)  # each rank's free slots in another order
        alloc = BorrowingPageAllocator(src, geo, max_chunks=size // geo.chunk_slots, agree_min=ranks.agree_min(r))
        stores.append((src, alloc, RankVote(ranks.agree_min(r)), random.Random(seed * 100 + r)))
    P = stores[0][1].pages_per_chunk
    pages: list[dict[object, list[int]]] = [{} for _ in range(R)]
    sglang: dict[int, list[list[int]]] = {}  # holder -> its slots on each rank

    def compress(who, fail_rank=None):
        def step(r):
            src, alloc, vote, own = stores[r]
            need = own.randint(0, 3 * P)  # this rank's heads' pages
            try:
                if r == fail_rank:  # failed before the borrow: its closing vote meets the others' flagged one
                    raise ValueError("scoring failed")
                borrow_together(vote, alloc, need)
                ids = alloc.allocate(need, owner=who)
            except Exception as e:  # noqa: BLE001
                if not getattr(e, "agreed", False):
                    with pytest.raises(type(e)):
                        vote.close(e)
                return type(e).__name__
            vote.close(None)
            pages[r][who] = ids
            return "ok"
        return ranks.run(step)

    for step in range(120):
        op = rng.choice(["sg_alloc", "sg_alloc", "sg_free", "compress", "compress", "release", "settle", "fail"])
        if op == "sg_alloc":
            n = rng.randint(1, 30)
            got = [s.alloc(n) for s, *_ in stores]
            assert len({g is None for g in got}) == 1, "the ranks' token allocators disagree"
            if got[0] is not None:
                sglang[step] = [g.tolist() for g in got]
        elif op == "sg_free" and sglang:
            for (s, *_), slots in zip(stores, sglang.pop(rng.choice(list(sglang)))):
                s.free(torch.tensor(slots))
        elif op == "compress":
            out = compress(step)
            assert len(set(out)) == 1, f"the ranks disagree on a compression: {out}"
            if out[0] != "ok":  # a full memory: every rank refused, none holds pages for it
                assert out[0] == "PoolFullError" and all(step not in p for p in pages)
        elif op == "fail":  # one rank fails: nobody borrows, every rank raises
            out = compress(step, fail_rank=rng.randrange(R))
            assert sorted(set(out)) in (["PeerFailed", "ValueError"], ["ValueError"]), out
        elif op == "release" and pages[0]:
            who = rng.choice(list(pages[0]))
            for r, (_, alloc, *_) in enumerate(stores):
                alloc.free(pages[r].pop(who), owner=who)
        elif op == "settle":
            given = ranks.run(lambda r: stores[r][1].settle())
            assert len(set(given)) == 1
        for r, (src, alloc, *_) in enumerate(stores):
            alloc.check_integrity({w: p for w, p in pages[r].items() if p})
            held = [s for ss in sglang.values() for s in ss[r]]
            borrowed = alloc.chunk_slots[alloc.chunk_live].flatten().tolist()
            assert sorted(src.free_slots + held + borrowed) == list(range(1, size + 1))
        assert len({s.available_size() for s, *_ in stores}) == 1, "the ranks' free slots differ"
        assert len({a.borrowed_chunks for _, a, *_ in stores}) == 1
        assert len(set(ranks.calls)) == 1, f"the ranks made different numbers of collective calls: {ranks.calls}"
    assert any(a.totals["borrowed_chunks"] for _, a, *_ in stores)
    for r, (src, alloc, *_) in enumerate(stores):
        for who in list(pages[r]):
            alloc.free(pages[r].pop(who), owner=who)
    for who in list(sglang):
        for (s, *_), slots in zip(stores, sglang.pop(who)):
            s.free(torch.tensor(slots))
    ranks.run(lambda r: stores[r][1].settle())
    for src, alloc, *_ in stores:
        assert alloc.borrowed_chunks == 0 and src.available_size() == size
        assert alloc.admission_free == 0


def test_lockstep_allocator_never_borrows_alone():
    src = FakeTokenAllocator(64, 0)
    geo = SlotGeometry.smallest(2, 1, 4, rows=65)
    alloc = BorrowingPageAllocator(src, geo, max_chunks=64 // geo.chunk_slots, agree_min=lambda x: x)
    with pytest.raises(PoolFullError, match="only an agreed borrow"):
        alloc.allocate(1, owner="r")
    alloc.borrow_agreed(1, 1)
    ids = alloc.allocate(1, owner="r")
    alloc.free(ids, owner="r")
    assert alloc.borrowed_chunks == 1  # kept until a settle
    alloc.check_integrity({})
    assert alloc.settle() == 1 and alloc.borrowed_chunks == 0 and src.available_size() == 64
