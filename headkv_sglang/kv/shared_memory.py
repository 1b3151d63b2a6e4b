"""One KV memory: compressed pages stored inside SGLang's token slots (``--kv-memory shared``).

SGLang's token pool keeps, per layer, K and V buffers ``[rows, Hkv, D]``; a token *slot*
``s`` is row ``s`` of every layer: ``layers x Hkv`` head-vectors of K and as many of V. A
compressed page is ``page_size`` head-vectors of one (layer, KV head), K and V, so one
slot's bytes hold ``layers * Hkv / page_size`` pages of *any* (layer, head). Three pieces:

* :class:`SlotGeometry` — the arithmetic: a *chunk* is ``chunk_slots`` token slots (any
  slots, not consecutive ones) whose ``chunk_slots * layers * Hkv`` head-vectors are cut
  into ``pages_per_chunk`` whole pages, none left over.
* :class:`BorrowingPageAllocator` — ownership: borrows chunks of slots from a
  :class:`SlotSource` (SGLang's token allocator: ``alloc(n)`` -> slot ids or None,
  ``free(ids)``, ``available_size()``) when its pages run out, and gives a chunk back the
  moment its last page is freed. Page ``p`` is page ``p % pages_per_chunk`` of chunk
  ``p // pages_per_chunk``; pages of chunks not borrowed exist in the id space but are
  *absent* (neither free nor owned). The same owner API as
  :class:`~headkv_sglang.kv.pool.PageAllocator` (the manager uses either), bookkeeping as
  tensors: ``_owner [num_pages]``, the chunk table ``chunk_slots [max_chunks, chunk_slots]``
  and ``chunk_used [max_chunks]``; an allocation costs O(chunks + pages of the chunks it
  takes from), a free O(pages freed), only :meth:`~BorrowingPageAllocator.check_integrity`
  walks everything.
* :class:`SharedPagePool` — storage: a :class:`~headkv_sglang.kv.pool.RaggedHeadKVPool`
  whose pages live in the layer buffers ``k_all``/``v_all`` ``[layers, rows, Hkv, D]``
  (SGLang's per-layer buffers are the views ``k_all[l]``, :func:`layer_buffers`). Everything
  outside the pool addresses a page's tokens as ``page * page_size + slot`` (a *page
  address*, as with the separate pool); :meth:`SharedPagePool.physical` turns those into
  rows of ``k_all.view(-1, D)``.

Which head-vector is token ``t`` of page ``p``: with ``u = (p % pages_per_chunk) *
page_size + t`` (its place in the chunk), ``i = u // (layers * Hkv)`` (which of the chunk's
slots), ``r = u % (layers * Hkv)``: layer ``r // Hkv``, head ``r % Hkv`` of slot
``chunk_slots[p // pages_per_chunk, i]``. A page may so span two slots, and its layer need
not be the layer it holds tokens of (bytes are bytes).

Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from headkv_sglang.kv.pool import PageAllocator, PoolFullError, RaggedHeadKVPool, _as_ids


class SlotSource(Protocol):
    """SGLang's token allocator, as the borrowing allocator sees it."""

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """``need_size`` free slot ids (any order, int64/int32), or None when fewer are free."""

    def free(self, free_index: torch.Tensor) -> None:
        """Give slots back."""

    def available_size(self) -> int:
        """Slots ``alloc`` could hand out now."""


@dataclass(frozen=True)
class SlotGeometry:
    """How token slots are cut into pages. ``rows``: rows of each layer's buffer (SGLang's
    pool has a few padding rows past its slots)."""

    num_layers: int
    num_kv_heads: int
    page_size: int
    chunk_slots: int
    rows: int

    def __post_init__(self) -> None:
        per_slot = self.num_layers * self.num_kv_heads
        if min(self.num_layers, self.num_kv_heads, self.page_size, self.chunk_slots, self.rows) <= 0:
            raise ValueError(f"every size must be > 0: {self}")
        if self.chunk_slots * per_slot % self.page_size:
            raise ValueError(
                f"a chunk of {self.chunk_slots} slots holds {self.chunk_slots * per_slot} head-vectors "
                f"({self.num_layers} layers x {self.num_kv_heads} KV heads each), not a whole number of "
                f"{self.page_size}-token pages; use a multiple of "
                f"{min_chunk_slots(self.num_layers, self.num_kv_heads, self.page_size)} slots")

    @property
    def per_slot(self) -> int:
        """Head-vectors (of K, and as many of V) in one slot."""
        return self.num_layers * self.num_kv_heads

    @property
    def pages_per_chunk(self) -> int:
        return self.chunk_slots * self.per_slot // self.page_size

    @classmethod
    def smallest(cls, num_layers: int, num_kv_heads: int, page_size: int, rows: int,
                 at_least: int = 1) -> "SlotGeometry":
        """The smallest chunk that cuts into whole pages, at least ``at_least`` slots."""
        c = min_chunk_slots(num_layers, num_kv_heads, page_size)
        return cls(num_layers, num_kv_heads, page_size, c * math.ceil(at_least / c), rows)


def min_chunk_slots(num_layers: int, num_kv_heads: int, page_size: int) -> int:
    """Fewest slots whose head-vectors make whole pages: ``page_size / gcd(layers * Hkv, page_size)``."""
    return page_size // math.gcd(num_layers * num_kv_heads, page_size)


def layer_buffers(num_layers: int, rows: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor],
                                                       list[torch.Tensor]]:
    """``k_all, v_all`` ``[layers, rows, Hkv, D]`` (zeros), views of one ``[layers, 2, rows,
    Hkv, D]`` allocation (each layer's K and V side by side, as SGLang 0.5.23 lays them out),
    and their per-layer views (each contiguous: what SGLang's pool keeps as
    ``k_buffer``/``v_buffer``)."""
    kv = torch.zeros(num_layers, 2, rows, num_kv_heads, head_dim, dtype=dtype, device=device)
    k_all, v_all = kv[:, 0], kv[:, 1]
    return k_all, v_all, list(k_all.unbind(0)), list(v_all.unbind(0))


class BorrowingPageAllocator(PageAllocator):
    """Pages of chunks of token slots borrowed from ``source`` (see the module docstring).

    ``max_chunks``: the most chunks it may hold (the id space is ``max_chunks *
    pages_per_chunk`` pages); normally the source's slots // ``chunk_slots``.
    Page states in ``_owner``: an owner handle (>= 0), ``FREE`` (-1: in a borrowed chunk,
    nobody's), ``ABSENT`` (-3: its chunk is not borrowed). Invariants
    (:meth:`check_integrity`): a borrowed chunk holds at least one owned page (an emptied
    chunk goes back at once; not in lockstep, below), its slots are distinct from every other
    chunk's, and the counters agree with the pages.

    *Lockstep* (``agree_min``: the minimum over the tensor-parallel ranks of an int, or of each
    int of a tuple): SGLang's
    schedulers of the ``--tp`` ranks decide alike only while their token allocators hold as
    many free slots, but each rank stores different heads' pages. So every rank borrows the
    same number of chunks at the same moment (:meth:`borrow_agreed`, the most any rank needs,
    called by every rank of a step), :meth:`allocate` never borrows by itself, an emptied
    chunk stays borrowed, and :meth:`settle` (called by every rank at the same point of the
    scheduler's loop) gives back as many empty chunks as every rank has. The free pages
    admission may count on are then :attr:`admission_free` (the fewest of any rank at the
    last settle).
    """

    ABSENT = -3

    def __init__(self, source: SlotSource, geometry: SlotGeometry, max_chunks: int,
                 agree_min=None) -> None:
        if max_chunks <= 0:
            raise ValueError(f"max_chunks must be > 0, got {max_chunks}")
        self.source = source
        self.geometry = geometry
        self.max_chunks = max_chunks
        P = self.pages_per_chunk = geometry.pages_per_chunk
        self.num_pages = max_chunks * P
        self._owner = torch.full((self.num_pages,), self.ABSENT, dtype=torch.int32)
        self.chunk_slots = torch.full((max_chunks, geometry.chunk_slots), -1, dtype=torch.int64)
        self.chunk_used = torch.zeros(max_chunks, dtype=torch.int64)  # owned pages per chunk
        self.chunk_live = torch.zeros(max_chunks, dtype=torch.bool)
        self._spare_chunks = torch.arange(max_chunks - 1, -1, -1, dtype=torch.int64)  # lowest ids first
        self._spare_top = max_chunks
        self._free_in_chunks = 0
        self._held = 0
        self._handles: dict[object, int] = {}
        self._owners: list[object] = []
        self._counts: list[int] = []
        self._spare: list[int] = []
        self.totals = {"borrowed_chunks": 0, "returned_chunks": 0}
        self._source_cleared = False
        self.agree_min = agree_min
        self._agreed_free = 0  # lockstep: the fewest free pages of borrowed chunks of any rank, at the last settle

    @property
    def lockstep(self) -> bool:
        return self.agree_min is not None

    # ------------------------------------------------------------------ counts
    @property
    def borrowed_chunks(self) -> int:
        return self.max_chunks - self._spare_top

    @property
    def borrowed_slots(self) -> int:
        return self.borrowed_chunks * self.geometry.chunk_slots

    @property
    def free_in_chunks(self) -> int:
        """Free pages of borrowed chunks (no borrowing needed)."""
        return self._free_in_chunks

    @property
    def free_pages(self) -> int:
        """Pages an :meth:`allocate` could hand out now: free ones of borrowed chunks, plus the
        chunks the source's free slots make."""
        chunks = min(self.source.available_size() // self.geometry.chunk_slots, self._spare_top)
        return self._free_in_chunks + chunks * self.pages_per_chunk

    @property
    def used_pages(self) -> int:
        return self._held

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.free_pages

    def chunks_to_borrow(self, n: int, free: int | None = None) -> int:
        """Chunks an :meth:`allocate` of ``n`` pages borrows (0: the free pages of borrowed
        chunks cover it); ``free``: counting that many free pages instead of this rank's."""
        short = n - (self._free_in_chunks if free is None else free)
        return 0 if short <= 0 else -(-short // self.pages_per_chunk)

    @property
    def admission_free(self) -> int:
        """Free pages of borrowed chunks that admission counts on: this rank's, or in lockstep
        the fewest of any rank at the last :meth:`settle` (every rank's admission the same)."""
        return self._agreed_free if self.lockstep else self._free_in_chunks

    def borrow_agreed(self, k: int, n: int) -> None:
        """Lockstep: borrow ``k`` chunks (the most any rank needs for its ``n`` pages; every rank
        calls this with the same ``k``, and fails alike: their sources hold as many free slots)."""
        if k > 0:
            self._borrow(k, n)

    def settle(self) -> int:
        """Lockstep: give back as many empty chunks as every rank has (each rank its own
        empty ones), and agree on :attr:`admission_free`. Every rank calls it at the same
        point (one ``agree_min`` over the pair: a rank's empty chunks, its free pages; giving
        back ``k`` empty chunks frees ``k`` chunks' pages on every rank alike). Returns the
        chunks given back."""
        if not self.lockstep:
            return 0
        empty = (self.chunk_live & (self.chunk_used == 0)).nonzero().flatten()
        k, least_free = (int(x) for x in self.agree_min((int(empty.numel()), self._free_in_chunks)))
        if k > 0:
            before = self._free_in_chunks
            self._give_back(empty[:k])
            assert before - self._free_in_chunks == k * self.pages_per_chunk, "an empty chunk had owned pages"
        self._agreed_free = least_free - k * self.pages_per_chunk
        return k

    # ------------------------------------------------------------------ allocate / free
    def allocate(self, n: int, owner: object) -> list[int]:
        if n < 0:
            raise ValueError(f"asked for {n} pages")
        if n == 0:
            return []
        k = self.chunks_to_borrow(n)
        if k and self.lockstep:  # the ranks borrow together (borrow_agreed), never one alone
            raise PoolFullError(f"asked for {n} pages with {self._free_in_chunks} free in borrowed chunks: in "
                                f"lockstep only an agreed borrow takes more chunks")
        if k:
            self._borrow(k, n)
        P = self.pages_per_chunk
        # fullest chunks first (emptier ones drain and go back); a fresh chunk is the emptiest
        free_c = torch.where(self.chunk_live, P - self.chunk_used, 0)
        order = torch.sort(free_c, descending=False, stable=True).indices
        order = order[free_c.index_select(0, order) > 0]
        take = order[:int(torch.searchsorted(torch.cumsum(free_c.index_select(0, order), 0), n)) + 1]
        pages = (take[:, None] * P + torch.arange(P)).flatten()
        ids = pages[self._owner.index_select(0, pages) == self.FREE][:n]
        assert ids.numel() == n, f"found {ids.numel()} free pages of {n} in chunks {take.tolist()}"
        self._own(ids, owner)
        self.chunk_used.index_add_(0, torch.div(ids, P, rounding_mode="floor"), torch.ones_like(ids))
        self._free_in_chunks -= n
        self._held += n
        return ids.tolist()

    def free(self, ids: list[int] | torch.Tensor, owner: object) -> None:
        idx = self._checked(ids, owner, "freed by", "free")
        n = idx.numel()
        if n == 0:
            return
        self._disown(idx, owner)
        chunks = torch.div(idx, self.pages_per_chunk, rounding_mode="floor")
        self.chunk_used.index_add_(0, chunks, torch.full_like(chunks, -1))
        self._free_in_chunks += n
        self._held -= n
        if self.lockstep:  # emptied chunks go back at the next settle, on every rank alike
            return
        touched = torch.unique(chunks)
        empty = touched[self.chunk_used.index_select(0, touched) == 0]
        if empty.numel():
            self._give_back(empty)

    def _borrow(self, k: int, n: int) -> None:
        """Borrow ``k`` chunks (all or none; PoolFullError naming ``n`` pages if it cannot)."""
        C = self.geometry.chunk_slots
        if k > self._spare_top:
            raise PoolFullError(f"asked for {n} pages: {self._free_in_chunks} free in borrowed chunks and "
                                f"{self._spare_top} more chunks allowed, {k} needed")
        slots = self.source.alloc(k * C)
        if slots is None:
            raise PoolFullError(f"asked for {n} pages: {self._free_in_chunks} free in borrowed chunks, and "
                                f"the token allocator has {self.source.available_size()} free slots, "
                                f"{k * C} needed ({k} chunks of {C})")
        slots = _as_ids(slots)
        assert slots.numel() == k * C, f"the token allocator gave {slots.numel()} slots for {k * C}"
        chunks = self._spare_chunks[self._spare_top - k:self._spare_top].flip(0)
        self._spare_top -= k
        self.chunk_slots[chunks] = slots.view(k, C)
        self.chunk_live[chunks] = True
        pages = (chunks[:, None] * self.pages_per_chunk + torch.arange(self.pages_per_chunk)).flatten()
        self._owner.index_fill_(0, pages, self.FREE)
        self._free_in_chunks += k * self.pages_per_chunk
        self.totals["borrowed_chunks"] += k

    @contextlib.contextmanager
    def source_cleared(self):
        """The source took every slot back at once (SGLang's ``flush_cache`` clears its token
        allocator, borrowed slots included): chunks emptied inside the block are not given
        back a second time, and at its end every borrowed chunk is forgotten. No page may
        still be in use then (an idle server's shared prompts are freed inside the block):
        its bytes are the source's again, so that is an error, not a leak."""
        self._source_cleared = True
        try:
            yield
        finally:
            self._source_cleared = False
        if self._held:
            raise RuntimeError(f"the token allocator took back every slot while {self._held} compressed pages "
                               f"were in use: their bytes may be handed out twice")
        live = self.chunk_live.nonzero().flatten()
        if live.numel():
            self._give_back(live, to_source=False)
        self._agreed_free = 0

    def _give_back(self, chunks: torch.Tensor, to_source: bool = True) -> None:
        """Return emptied ``chunks``' slots to the source (``to_source=False`` or inside
        :meth:`source_cleared`: the source has them already)."""
        k, P = chunks.numel(), self.pages_per_chunk
        slots = self.chunk_slots[chunks].flatten()
        pages = (chunks[:, None] * P + torch.arange(P)).flatten()
        self._owner.index_fill_(0, pages, self.ABSENT)
        self.chunk_slots[chunks] = -1
        self.chunk_live[chunks] = False
        self._spare_chunks[self._spare_top:self._spare_top + k] = chunks
        self._spare_top += k
        self._free_in_chunks -= k * P
        self.totals["returned_chunks"] += k
        if to_source and not self._source_cleared:
            self.source.free(slots)

    # ------------------------------------------------------------------ the full walk
    def check_integrity(self, owned: dict[object, list[int]] | None = None) -> None:
        """Pages and chunks agree: every borrowed chunk has distinct slots and at least one
        owned page, no page of an unborrowed chunk is free or owned, the counters (free,
        held, per chunk, per owner) match the pages; optionally the owners' tables
        (``owned``) match the allocator. Walks everything."""
        P, C = self.pages_per_chunk, self.geometry.chunk_slots
        live = self.chunk_live
        spare = self._spare_chunks[:self._spare_top]
        if torch.bincount(spare, minlength=self.max_chunks).gt(1).any() or bool(live[spare].any()):
            raise AssertionError(f"spare chunk list is wrong: {sorted(spare.tolist())[:10]} (live ones or twice)")
        if int(live.sum()) + spare.numel() != self.max_chunks:
            raise AssertionError(f"chunk leak: {int(live.sum())} borrowed + {spare.numel()} spare != {self.max_chunks}")
        slots = self.chunk_slots[live].flatten()
        if bool((slots < 0).any()) or torch.unique(slots).numel() != slots.numel():
            raise AssertionError(f"borrowed chunks hold bad or repeated slots: {slots.tolist()[:20]}")
        if bool((self.chunk_slots[~live] != -1).any()):
            raise AssertionError("a chunk that is not borrowed still names slots")
        state = self._owner.view(self.max_chunks, P)
        absent = state == self.ABSENT
        if bool(absent[live].any()) or not bool(absent[~live].all()):
            raise AssertionError("pages of borrowed chunks are absent, or pages of spare chunks are not")
        used = (state >= 0).sum(1)
        if not torch.equal(used, self.chunk_used):
            bad = (used != self.chunk_used).nonzero().flatten()[:10].tolist()
            raise AssertionError(f"chunk page counters disagree with the pages in chunks {bad}")
        empty = (live & (used == 0)).nonzero().flatten()
        if empty.numel() and not self.lockstep:
            raise AssertionError(f"borrowed chunks with no owned page (not given back): {empty[:10].tolist()}")
        n_free = int((state == self.FREE).sum())
        if n_free != self._free_in_chunks or int(used.sum()) != self._held:
            raise AssertionError(f"counters: {self._free_in_chunks} free / {self._held} held, pages say "
                                 f"{n_free} / {int(used.sum())}")
        per_handle = torch.bincount(self._owner[self._owner >= 0].to(torch.int64),
                                    minlength=len(self._owners)).tolist()
        counted = {self._owners[h]: c for h, c in enumerate(per_handle) if c}
        if counted != self.owner_counts():
            raise AssertionError(f"owner counters disagree with the pages: counters {self.owner_counts()}, "
                                 f"pages {counted}")
        if owned is not None:
            self._check_tables(owned)

    def check_counts(self, owned: dict[object, int]) -> None:
        held = sum(self._counts[h] for h in self._handles.values())
        if held != self._held:
            raise AssertionError(f"page leak: owners hold {held}, the allocator counts {self._held}")
        want = {who: n for who, n in owned.items() if n}
        if want != self.owner_counts():
            raise AssertionError(f"page counts disagree with the allocator: tables {want}, "
                                 f"allocator {self.owner_counts()}")


class SharedPagePool(RaggedHeadKVPool):
    """Pages stored in the layer buffers ``k_all``/``v_all`` ``[layers, rows, Hkv, D]`` (any
    strides that keep head-vectors whole, e.g. views of SGLang's ``[layers, 2, rows, Hkv, D]``
    K/V allocation), at the slots ``allocator`` borrowed (see the module docstring). Same interface as the separate
    pool except that there is no ``k_pages``/``v_pages`` tensor: :attr:`k_flat`/:attr:`v_flat`
    ``[layers * rows * Hkv, D]`` and :meth:`physical`."""

    contiguous = False

    def __init__(self, k_all: torch.Tensor, v_all: torch.Tensor, allocator: BorrowingPageAllocator) -> None:
        g = allocator.geometry
        L, rows, H, D = k_all.shape
        if (L, rows, H) != (g.num_layers, g.rows, g.num_kv_heads) or v_all.shape != k_all.shape:
            raise ValueError(f"buffers {list(k_all.shape)} / {list(v_all.shape)} do not match {g}")
        st = k_all.stride()
        if v_all.stride() != st or st[3] != 1 or st[2] != D or st[1] % D or st[0] % D:
            raise ValueError(f"k_all/v_all need the same strides, whole head-vectors (strides [*, *, {D}, 1]), "
                             f"got {list(st)} / {list(v_all.stride())}")
        # head-vector (layer l, slot s, head h) is row l * layer_stride + s * slot_stride + h of k_flat
        self.layer_stride, self.slot_stride = st[0] // D, st[1] // D
        self._rows = (L - 1) * self.layer_stride + (rows - 1) * self.slot_stride + H
        self.num_pages, self.page_size, self.head_dim = allocator.num_pages, g.page_size, D
        self.dtype = k_all.dtype
        self.allocator, self.geometry = allocator, g
        self.k_all, self.v_all = k_all, v_all
        self.k_pages = self.v_pages = None

    @property
    def device(self) -> torch.device:
        return self.k_all.device

    @property
    def k_flat(self) -> torch.Tensor:
        """``[N, D]`` over ``k_all``'s bytes (the same memory: SGLang's K buffers)."""
        return torch.as_strided(self.k_all, (self._rows, self.head_dim), (self.head_dim, 1))

    @property
    def v_flat(self) -> torch.Tensor:
        return torch.as_strided(self.v_all, (self._rows, self.head_dim), (self.head_dim, 1))

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.page_size * self.head_dim * self.k_all.element_size()

    def physical(self, addr: torch.Tensor) -> torch.Tensor:
        """Rows of :attr:`k_flat`/:attr:`v_flat` holding page addresses ``addr`` (int64, any shape:
        ``page * page_size + token``). Pages of chunks not borrowed map to slot 0 (reads of
        padding only)."""
        g = self.geometry
        addr = addr.to(torch.int64)
        page = torch.div(addr, g.page_size, rounding_mode="floor")
        P = self.allocator.pages_per_chunk
        u = (page % P) * g.page_size + addr % g.page_size
        chunk = torch.div(page, P, rounding_mode="floor")
        slots = self.allocator.chunk_slots.to(addr.device)
        slot = slots[chunk, torch.div(u, g.per_slot, rounding_mode="floor")].clamp(min=0)
        r = u % g.per_slot
        return torch.div(r, g.num_kv_heads, rounding_mode="floor") * self.layer_stride + slot * self.slot_stride \
            + r % g.num_kv_heads

    def gather_padded(self, layer):
        raise NotImplementedError("gather_padded reads k_pages; use the ragged kernel with a shared pool")
