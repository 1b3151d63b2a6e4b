"""serving/one_memory.py with stand-ins for SGLang's objects (no server): the K/V buffers
re-laid as one allocation, the token allocator as slot source (radix eviction before a
borrow that the free slots cannot serve), the leak check counting borrowed slots, and the
/server_info memory view adding up."""

from __future__ import annotations

import types

import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.serving import one_memory
from headkv_sglang.serving.state import ServingState


class Allocator:
    """SGLang's token allocator: slots 1..size; ``evict_to_free_tokens`` frees the tree's."""

    def __init__(self, size: int) -> None:
        self.size, self.device = size, "cpu"
        self.free_slots = list(range(size, 0, -1))

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, n: int):
        if n > len(self.free_slots):
            return None
        out = [self.free_slots.pop() for _ in range(n)]
        return torch.tensor(out, dtype=torch.int64)

    def free(self, idx) -> None:
        self.free_slots += idx.tolist()

    def evict_to_free_tokens(self, tree, n: int) -> None:
        while self.available_size() < n and tree.cached:
            self.free(torch.tensor([tree.cached.pop()]))


class Tree:
    def __init__(self, cached: list[int]) -> None:
        self.cached = cached

    def evictable_size(self) -> int:
        return len(self.cached)

    def supports_prefix_sharing(self) -> bool:
        return True


def shared_state(L=3, H=2, D=4, size=64, page_size=4):
    state = ServingState(KVPolicyConfig(policy="snapkv", page_size=page_size, memory="shared").validate())
    kv_pool = types.SimpleNamespace(size=size, k_buffer=[torch.randn(size + 1, H, D) for _ in range(L)],
                                    v_buffer=[torch.randn(size + 1, H, D) for _ in range(L)])
    one_memory.one_allocation(state, None, kv_pool)
    return state, kv_pool


def test_buffers_become_views_of_one_allocation():
    state, kv_pool = shared_state()
    kv = kv_pool._headkv_kv
    assert list(kv.shape) == [3, 2, 65, 2, 4]
    for layer in range(3):
        assert kv_pool.k_buffer[layer].is_contiguous() and kv_pool.k_buffer[layer].shape == (65, 2, 4)
        kv_pool.k_buffer[layer][7] = layer + 1.0
        kv_pool.v_buffer[layer][9] = -layer - 1.0
        assert bool((kv[layer, 0, 7] == layer + 1).all()) and bool((kv[layer, 1, 9] == -layer - 1).all())
    split = ServingState(KVPolicyConfig(policy="snapkv").validate())
    pool = types.SimpleNamespace(k_buffer=["k"], v_buffer=["v"])
    one_memory.one_allocation(split, None, pool)  # split: untouched
    assert pool.k_buffer == ["k"] and not hasattr(pool, "_headkv_kv")


def test_borrowing_evicts_the_radix_tree_and_everything_adds_up():
    state, kv_pool = shared_state(size=64)
    alloc = Allocator(64)
    sglang_running = alloc.alloc(20)  # running requests
    tree = Tree(alloc.alloc(40).tolist())  # the radix tree's evictable cache: 4 slots free
    state.scheduler = types.SimpleNamespace(tree_cache=tree, token_to_kv_pool_allocator=alloc, max_total_num_tokens=64)
    pool, pages = one_memory.build(state, kv_pool, alloc, num_kv_heads=2)
    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=4)
    state.manager = CompressionManager(shape, 0, 0, torch.float32, "cpu", pool=pool, allocator=pages)
    C, P = pages.geometry.chunk_slots, pages.pages_per_chunk
    assert C == 8 and P == 12  # at least 8 slots; 8 * 3 * 2 / 4 pages
    assert pages.free_pages == (44 // C) * P  # free + evictable slots, in whole chunks
    ids = pages.allocate(2 * P, owner=1)  # 16 slots: 4 free + 12 evicted from the tree
    assert tree.evictable_size() == 28 and alloc.available_size() == 0 and pages.borrowed_slots == 16
    report = one_memory.memory_report(state)
    assert report["slots_borrowed_by_pages"] == 16 and report["slots_free"] == 0
    assert report["slots_used_by_sglang"] == 64 - 16 and report["slots_evictable"] == 28
    # SGLang's idle leak check: available + evictable + protected + ... + uncached == total
    seen = {}
    one_memory.count_borrowed(state, lambda checker, ps, uncached=0: seen.setdefault("uncached", uncached),
                              "checker", "ps", uncached=20)
    assert seen["uncached"] == 20 + 16
    pages.free(ids, owner=1)
    assert pages.borrowed_slots == 0 and alloc.available_size() == 16
    alloc.free(sglang_running)
    assert alloc.available_size() + tree.evictable_size() == 64


class Adder:
    """SGLang's PrefillAdder as far as admission goes, over SGLang's own PrefillBudget: a request
    is admitted while its prompt fits the remaining tokens (free + evictable - offsets)."""

    def __init__(self, allocator, tree) -> None:
        from sglang.srt.mem_cache.prefill_budget import PrefillBudget

        self.memory_budget = PrefillBudget(allocator, tree)
        self.can_run_list, self.new_chunked_req = [], None

    def add_one_req(self, req, has_chunked_req=False, truncation_align_size=None):
        ok, _ = self.memory_budget.check_prefill(extend_input_len=req.n, total_tokens=req.n, max_new_tokens=0,
                                                 input_tokens=req.n, swa_host_hit_length=0, chunk_limit=None)
        if not ok:
            return "NO_TOKEN"
        self.memory_budget.reserve(req.n, 0)
        self.can_run_list.append(req)
        return "CONTINUE"


def test_sglang_admission_holds_back_the_slots_pages_will_borrow(monkeypatch):
    """A prompt to be compressed needs its prefill's slots and, inside the forward, its pages'
    slots: SGLang's remaining tokens leave out what admitted requests' pages will borrow."""
    from headkv_sglang.serving import admission, requests

    state, kv_pool = shared_state(size=64)
    alloc = Allocator(64)
    alloc.page_size = 1
    tree = Tree([])
    tree.supports_mamba = lambda: False
    state.scheduler = types.SimpleNamespace(tree_cache=tree, token_to_kv_pool_allocator=alloc, max_total_num_tokens=64)
    pool, pages = one_memory.build(state, kv_pool, alloc, num_kv_heads=2)
    shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=4)
    m = state.manager = CompressionManager(shape, 0, 0, torch.float32, "cpu", pool=pool, allocator=pages)
    C, P = pages.geometry.chunk_slots, pages.pages_per_chunk  # 8 slots, 12 pages
    assert one_memory.page_slots(pages, 0) == 0 and one_memory.page_slots(pages, 1) == C
    assert one_memory.page_slots(pages, P) == C and one_memory.page_slots(pages, P + 1) == 2 * C
    m.reserve(5, 20)  # admitted earlier, not compressed yet: 2 chunks promised
    monkeypatch.setattr(requests, "request_config", lambda st, req: None)
    monkeypatch.setattr(admission, "pages_bound", lambda st, req, cfg: req.pages)
    req = lambda n, p: types.SimpleNamespace(n=n, pages=p, origin_input_ids=[7] * n, output_ids=[])  # noqa: E731

    def admit(*reqs):
        adder = Adder(alloc, tree)
        one_memory.promise_page_slots(state, None, adder)
        out = [one_memory.add_with_page_slots(state, Adder.add_one_req, adder, r) for r in reqs]
        return adder, out

    adder, out = admit(req(30, 12), req(9, 12), req(5, 0))
    # 64 slots - 16 promised: the first (30 + its 8) fits; the second's 9 + 8 more do not;
    # the uncompressed one (no pages) goes on as SGLang alone would decide
    assert out == ["CONTINUE", "NO_TOKEN", "CONTINUE"] and adder._headkv_promised_pages == 32
    assert adder.memory_budget.total_offset == 24 + (30 + 1) + (5 + 1)  # the refused one's hold went back
    # without the hooks SGLang would take all three into the slots the pages need
    plain = Adder(alloc, tree)
    assert [plain.add_one_req(r) for r in (req(30, 12), req(9, 12), req(5, 0))] == ["CONTINUE"] * 3
    # pages free in borrowed chunks need no slots: a 12-page chunk borrowed and half used
    ids = pages.allocate(6, owner=9)
    assert pages.free_in_chunks == P - 6 and one_memory.page_slots(pages, 18) == C
    assert one_memory.page_slots(pages, 20) == 2 * C
    adder, out = admit(req(30, 6))  # 20 + 6 promised, 6 of them free already: still 2 chunks
    assert out == ["CONTINUE"] and adder.memory_budget.total_offset == 2 * C + (30 + 1)
    pages.free(ids, owner=9)
    m.release_reservation(5)
    # a prompt whose slots and pages exceed the whole memory (57 + one 8-slot chunk > 64) is
    # weighed alone: SGLang admits it and its compression will find no room (served whole),
    # instead of it waiting forever; one that fits with its pages is still weighed with them
    assert one_memory.fits_with_its_pages(pages, 56, 12) and not one_memory.fits_with_its_pages(pages, 57, 12)
    assert not one_memory.fits_with_its_pages(pages, 1, 8 * P + 1)
    adder, out = admit(req(57, 12))
    assert out == ["CONTINUE"] and adder._headkv_promised_pages == 0 and adder.memory_budget.total_offset == 57 + 1
    adder, out = admit(req(56, 12))
    assert out == ["NO_TOKEN"] and adder.memory_budget.total_offset == 0  # 56 + 8 > 64 - 1 here
    # split memory: nothing changes
    split = ServingState(KVPolicyConfig(policy="snapkv").validate())
    adder = Adder(alloc, tree)
    assert one_memory.promise_page_slots(split, "r", adder) == "r" and adder.memory_budget.total_offset == 0


def test_a_flush_that_cleared_sglangs_allocator_does_not_give_borrowed_slots_back_twice():
    """SGLang's flush_cache clears its token allocator (every slot free again, those lent to
    pages too); the shared prompts the AFTER hook then frees must not return their chunks a
    second time (the soak on one memory died of it: 8176 slots available of 6000)."""
    import pytest

    from headkv_sglang.serving import lifecycle

    def setup():
        state, kv_pool = shared_state(size=64)
        alloc = Allocator(64)
        tree = Tree([])
        state.scheduler = types.SimpleNamespace(tree_cache=tree, token_to_kv_pool_allocator=alloc)
        pool, pages = one_memory.build(state, kv_pool, alloc, num_kv_heads=2)
        shape = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=4)
        m = state.manager = CompressionManager(shape, 0, 0, torch.float32, "cpu", pool=pool, allocator=pages)
        return state, alloc, pages, m

    state, alloc, pages, m = setup()
    doc = pages.allocate(2 * pages.pages_per_chunk + 1, owner="doc")  # an idle shared prompt: 3 chunks
    assert pages.borrowed_chunks == 3 and alloc.available_size() == 64 - 3 * pages.geometry.chunk_slots
    m.clear_shared = lambda: (pages.free(doc, owner="doc"), True)[1]
    alloc.free_slots = list(range(64, 0, -1))  # SGLang's flush: the allocator cleared
    assert lifecycle.after_flush_cache(state, True, state.scheduler) is True
    assert sorted(alloc.free_slots) == list(range(1, 65))  # every slot once
    assert pages.borrowed_chunks == 0 and pages.used_pages == 0 and pages.free_pages == 8 * pages.pages_per_chunk
    pages.check_integrity()
    again = pages.allocate(5, owner="next")  # borrowing works on as before
    assert pages.borrowed_chunks == 1 and alloc.available_size() == 64 - pages.geometry.chunk_slots
    pages.free(again, owner="next")
    assert alloc.available_size() == 64

    # a flush that did not happen (requests running) changes nothing
    state, alloc, pages, m = setup()
    held = pages.allocate(3, owner="row")
    m.clear_shared = lambda: pytest.fail("a refused flush must not free shared prompts")
    assert lifecycle.after_flush_cache(state, False, state.scheduler) is False
    assert pages.borrowed_chunks == 1 and pages.used_pages == 3
    # pages still in use when the allocator was cleared: their bytes are SGLang's again
    m.clear_shared = lambda: False
    with pytest.raises(RuntimeError, match="3 compressed pages were in use"):
        lifecycle.after_flush_cache(state, True, state.scheduler)
    del held
