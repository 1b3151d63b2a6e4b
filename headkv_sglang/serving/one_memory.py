"""``--kv-memory shared``: the SGLang side of one KV memory (:mod:`headkv_sglang.kv.shared_memory`).

* :func:`one_allocation` (AFTER ``MHATokenToKVPool._create_buffers_normal``): every layer's
  K and V buffers become views of one ``[layers, 2, rows, Hkv, D]`` allocation, so a page
  can live in any layer's bytes (each layer's view is laid out as SGLang lays it).
* :class:`TokenSlotSource`: SGLang's token allocator as the pages' slot source; a borrow
  evicts from the radix tree first when the free slots are short, as SGLang's own
  allocations do.
* :func:`count_borrowed` (AROUND the scheduler's full-pool invariant check): slots lent to
  compressed pages are accounted (as SGLang's "uncached" tokens), so the idle-time check
  still sees every slot.
* :func:`promise_page_slots` (AFTER ``PrefillAdder.__init__``) and :func:`add_with_page_slots`
  (AROUND ``PrefillAdder.add_one_req``): SGLang's admission counts the slots that compressed
  pages will borrow. A request admitted to be compressed needs its prefill's slots now and its
  pages' slots inside the forward that compresses it (before its prompt's slots go back);
  the pages promised to admitted requests not compressed yet (and to decode budgets), beyond
  the free pages of borrowed chunks, are held back from SGLang's remaining tokens, and so is
  each compressed request's own worst case while SGLang decides on it. Without this SGLang
  admits prefills into the slots the pages need, and their compressions fail (the requests
  stay whole: ``fallbacks.pool_full``).
* :func:`settle` (BEFORE ``Scheduler.get_new_batch_prefill``, every pass, busy or idle):
  under ``--tp`` the ranks' allocators run in lockstep (each rank stores other heads' pages,
  but SGLang's replicated schedulers need as many free slots on every rank): they borrow
  together inside compression steps (:func:`~headkv_sglang.kv.ranks.borrow_together`) and
  give emptied chunks back here, as many as every rank has, before admission counts them.
* :func:`memory_report`: ``/server_info``'s one-memory view (slots of SGLang, of pages, free,
  evictable).
"""

from __future__ import annotations

import logging

import torch

from headkv_sglang.kv.shared_memory import BorrowingPageAllocator, SharedPagePool, SlotGeometry
from headkv_sglang.serving.state import ServingState

logger = logging.getLogger("headkv_sglang")

#: slots per chunk at least (a multiple of the smallest chunk that cuts into whole pages)
CHUNK_SLOTS_AT_LEAST = 8


def one_allocation(state: ServingState, result, pool, *args, **kwargs):
    """Re-lay SGLang's per-layer K/V buffers as views of one allocation (``pool._headkv_kv``)."""
    if state.cfg.memory != "shared":
        return result
    k0, v0 = pool.k_buffer[0], pool.v_buffer[0]
    if k0.shape != v0.shape or k0.dim() != 3 or not k0.is_contiguous():
        raise SystemExit(f"headkv_sglang: --kv-memory shared needs [slots, heads, dim] K/V buffers of one shape; "
                         f"this KV pool has K {list(k0.shape)}, V {list(v0.shape)}")
    L = len(pool.k_buffer)
    pool.k_buffer = pool.v_buffer = None  # free the per-layer allocations first
    kv = torch.zeros(L, 2, *k0.shape, dtype=k0.dtype, device=k0.device)
    del k0, v0
    pool.k_buffer = [kv[l, 0] for l in range(L)]
    pool.v_buffer = [kv[l, 1] for l in range(L)]
    pool._headkv_kv = kv
    logger.info("headkv_sglang: --kv-memory shared: K/V of %d layers in one allocation %s (%.1f MB)", L,
                list(kv.shape), kv.numel() * kv.element_size() / 2**20)
    return result


class TokenSlotSource:
    """SGLang's token allocator as a :class:`~headkv_sglang.kv.shared_memory.SlotSource`.

    ``available_size`` counts the radix tree's evictable slots too (a borrow evicts them)."""

    def __init__(self, state: ServingState, allocator) -> None:
        self.state, self.allocator = state, allocator

    def _tree(self):
        sched = self.state.scheduler
        return getattr(sched, "tree_cache", None) if sched is not None else None

    def available_size(self) -> int:
        tree = self._tree()
        evictable = tree.evictable_size() if tree is not None else 0
        return self.allocator.available_size() + evictable

    def alloc(self, need_size: int):
        tree = self._tree()
        if self.allocator.available_size() < need_size and tree is not None and tree.supports_prefix_sharing():
            self.allocator.evict_to_free_tokens(tree, need_size)  # what SGLang's evict_from_tree_cache does
        return self.allocator.alloc(need_size)

    def free(self, free_index: torch.Tensor) -> None:
        self.allocator.free(free_index.to(getattr(self.allocator, "device", "cpu")))


def build(state: ServingState, kv_pool, token_allocator, num_kv_heads: int,
          agree_min=None) -> tuple[SharedPagePool, BorrowingPageAllocator]:
    """The shared pool and its borrowing allocator over SGLang's ``kv_pool`` (laid out by
    :func:`one_allocation`) and ``token_allocator``; ``agree_min`` (the minimum over the
    ``--tp`` ranks) makes the allocator borrow and give back in lockstep."""
    kv = getattr(kv_pool, "_headkv_kv", None)
    if kv is None:
        raise SystemExit("headkv_sglang: --kv-memory shared, but SGLang's KV buffers were not laid out as one "
                         "allocation (the MHATokenToKVPool hook did not run: an unsupported KV pool?)")
    L, _, rows, H, _ = kv.shape
    geo = SlotGeometry.smallest(L, num_kv_heads, state.cfg.page_size, rows=rows, at_least=CHUNK_SLOTS_AT_LEAST)
    source = TokenSlotSource(state, token_allocator)
    allocator = BorrowingPageAllocator(source, geo, max_chunks=max(1, kv_pool.size // geo.chunk_slots),
                                       agree_min=agree_min)
    return SharedPagePool(kv[:, 0], kv[:, 1], allocator), allocator


def count_borrowed(state: ServingState, original, checker, ps, uncached: int = 0):
    """AROUND ``SchedulerInvariantChecker._check_full_pool``: slots lent to pages count as used."""
    m = state.manager
    borrowed = m.allocator.borrowed_slots if m is not None and isinstance(m.allocator, BorrowingPageAllocator) else 0
    return original(checker, ps, uncached=uncached + borrowed)


def page_slots(allocator: BorrowingPageAllocator, pages: int) -> int:
    """Token slots that taking ``pages`` more pages would borrow: whole chunks for what the free
    pages of the borrowed chunks do not cover."""
    return allocator.chunks_to_borrow(pages, free=allocator.admission_free) * allocator.geometry.chunk_slots


def fits_with_its_pages(allocator: BorrowingPageAllocator, prompt_slots: int, pages: int) -> bool:
    """Whether a prompt of ``prompt_slots`` and its ``pages`` can be held at once in the whole
    memory (the pages are written while the prompt's KV is still in its slots)."""
    chunks = -(-pages // allocator.pages_per_chunk)
    return prompt_slots + chunks * allocator.geometry.chunk_slots <= allocator.max_chunks * allocator.geometry.chunk_slots


def _promised_pages(state: ServingState) -> int:
    m = state.manager
    return m.reserved_pages(uncommitted_only=True) + m.decode_pages_pending()


def _budget_of(adder):
    budget = getattr(adder, "memory_budget", None)
    if budget is None or not hasattr(budget, "total_offset"):
        raise SystemExit("headkv_sglang: --kv-memory shared needs SGLang's PrefillAdder.memory_budget "
                         "(total_offset/current_offset); this SGLang has none")
    return budget


def _hold_back(budget, slots: int) -> None:
    budget.total_offset += slots
    budget.current_offset += slots


def promise_page_slots(state: ServingState, result, adder, *args, **kwargs):
    """AFTER ``PrefillAdder.__init__``: the slots promised pages will borrow are not SGLang's to give."""
    m = state.manager
    if m is None or not isinstance(m.allocator, BorrowingPageAllocator):
        return result
    pages = _promised_pages(state)
    adder._headkv_promised_pages = pages
    _hold_back(_budget_of(adder), page_slots(m.allocator, pages))
    return result


def add_with_page_slots(state: ServingState, original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder.add_one_req``: a request to be compressed is weighed with the slots
    its pages may borrow (its worst case, :func:`~headkv_sglang.serving.admission.pages_bound`);
    admitted, they stay held back for the rest of this pass."""
    m = state.manager
    promised = getattr(adder, "_headkv_promised_pages", None)
    if m is None or promised is None or not isinstance(m.allocator, BorrowingPageAllocator):
        return original(adder, req, *args, **kwargs)
    from headkv_sglang.serving.admission import pages_bound
    from headkv_sglang.serving.requests import prompt_len, request_config

    need = pages_bound(state, req, request_config(state, req))
    if need <= 0 or not fits_with_its_pages(m.allocator, prompt_len(req), need):
        # not compressed, or a prompt whose slots and pages together exceed the whole memory:
        # SGLang weighs its prompt alone, and its compression finds no room (served whole,
        # counted as a pool_full fallback) instead of the request waiting forever
        return original(adder, req, *args, **kwargs)
    extra = page_slots(m.allocator, promised + need) - page_slots(m.allocator, promised)
    budget = _budget_of(adder)
    _hold_back(budget, extra)
    result = original(adder, req, *args, **kwargs)
    if any(r is req for r in adder.can_run_list) or adder.new_chunked_req is req:
        adder._headkv_promised_pages = promised + need
    else:
        _hold_back(budget, -extra)
    return result


def settle(state: ServingState, *args, **kwargs):
    """BEFORE ``Scheduler.get_new_batch_prefill``: a lockstep allocator (``--tp``) gives back
    the chunks every rank has emptied, and agrees on the free pages admission counts."""
    m = state.manager
    if m is not None and isinstance(m.allocator, BorrowingPageAllocator) and m.allocator.lockstep:
        m.allocator.settle()


def memory_report(state: ServingState) -> dict | None:
    """One memory in token slots: SGLang's own, the compressed pages', free, evictable."""
    m, sched = state.manager, state.scheduler
    if m is None or not isinstance(m.allocator, BorrowingPageAllocator):
        return None
    a = m.allocator
    out = {"mode": "shared", "lockstep": a.lockstep, "chunk_slots": a.geometry.chunk_slots,
           "pages_per_chunk": a.pages_per_chunk,
           "slots_borrowed_by_pages": a.borrowed_slots, "pages_used": a.used_pages,
           "pages_free_in_borrowed_chunks": a.free_in_chunks, **a.totals}
    if sched is not None:
        alloc, tree = sched.token_to_kv_pool_allocator, sched.tree_cache
        total = sched.max_total_num_tokens
        free = alloc.available_size()
        evictable = tree.evictable_size() if tree is not None else 0
        out.update(slots_total=total, slots_free=free, slots_evictable=evictable,
                   slots_used_by_sglang=total - free - a.borrowed_slots)
    return out
