"""RaggedHeadKVPool: compressed prompt KV in pages that each belong to one (layer, KV head).

Three pieces, kept apart:

* :class:`RaggedHeadKVPool` — storage: ``k_pages``/``v_pages`` ``[num_pages, page_size, head_dim]``.
* :class:`PageAllocator` — ownership: a free stack and per-page owners as arrays, counters
  kept as pages move, check/act pairs and :meth:`PageAllocator.check_integrity` (the full walk).
* :class:`LayerPages` / :class:`RequestPages` — one request's page table, in FlashInfer's
  CSR terms: for layer ``l`` the row of KV head ``h`` is pages
  ``kv_indices[kv_indptr[h]:kv_indptr[h+1]]`` holding ``lengths[h]`` tokens, the last
  page holding ``kv_last_page_len[h]``. Each (request, KV head) is one row of a
  ``num_kv_heads=1`` paged batch on the GPU.

Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field

import torch


class PoolFullError(RuntimeError):
    """The compressed pool has fewer free pages than asked for."""


class PageAllocator:
    """Free-stack page allocator. Page ids are ``0 .. num_pages-1``.

    The bookkeeping is two arrays, not a Python object per page: ``_stack`` int64
    ``[num_pages]`` (its first ``_top`` entries are the free pages, the last of them handed
    out next) and ``_owner`` int32 ``[num_pages]`` (each page's owner handle, ``-1`` when free);
    owners (any hashable object) get small integer handles while they hold pages, and a
    page count each. So :meth:`allocate`, :meth:`free` and :meth:`transfer` cost O(pages
    they move), the counts (:attr:`free_pages`, :attr:`used_pages`, :meth:`pages_of`,
    :meth:`owner_counts`) O(1) or O(owners), and only :meth:`check_integrity` walks the
    whole pool (tests, and ``/server_info`` with ``HEADKV_SGLANG_CHECK_INTEGRITY=1``).
    """

    FREE = -1

    def __init__(self, num_pages: int) -> None:
        assert num_pages > 0, f"num_pages must be > 0, got {num_pages}"
        self.num_pages = num_pages
        self._stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int64)  # the end is handed out first
        self._top = num_pages
        self._owner = torch.full((num_pages,), self.FREE, dtype=torch.int32)
        self._handles: dict[object, int] = {}  # owner -> handle, while it holds pages
        self._owners: list[object] = []  # handle -> owner (None: handle unused)
        self._counts: list[int] = []  # handle -> pages held
        self._spare: list[int] = []  # unused handles

    @property
    def free_pages(self) -> int:
        return self._top

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._top

    def pages_of(self, owner: object) -> int:
        """Pages ``owner`` holds (a counter: O(1))."""
        h = self._handles.get(owner)
        return 0 if h is None else self._counts[h]

    def owner_counts(self) -> dict[object, int]:
        """Every owner holding pages -> how many (counters: O(owners))."""
        return {who: self._counts[h] for who, h in self._handles.items()}

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._top

    def allocate(self, n: int, owner: object) -> list[int]:
        if not self.can_allocate(n):
            raise PoolFullError(f"asked for {n} pages, {self._top} of {self.num_pages} free")
        if n == 0:
            return []
        ids = self._stack[self._top - n:self._top].flip(0)
        self._top -= n
        self._own(ids, owner)
        return ids.tolist()

    def free(self, ids: list[int] | torch.Tensor, owner: object) -> None:
        # check every page first: a rejected free must leave the allocator unchanged
        idx = self._checked(ids, owner, "freed by", "free")
        n = idx.numel()
        if n == 0:
            return
        self._disown(idx, owner)
        self._stack[self._top:self._top + n] = idx
        self._top += n

    def transfer(self, ids: list[int] | torch.Tensor, owner: object, new_owner: object) -> None:
        """Hand ``owner``'s pages ``ids`` to ``new_owner`` (a request's compressed prompt
        becoming a shared one)."""
        idx = self._checked(ids, owner, "handed over by", "transfer")
        n = idx.numel()
        if n == 0:
            return
        self._disown(idx, owner)
        self._own(idx, new_owner)

    # ------------------------------------------------------------------ internals
    def _own(self, ids: torch.Tensor, owner: object) -> None:
        """Record free pages ``ids`` as ``owner``'s (owner table and count)."""
        h = self._handle(owner)
        self._owner.index_fill_(0, ids, h)
        self._counts[h] += ids.numel()

    def _disown(self, ids: torch.Tensor, owner: object) -> None:
        """Record ``owner``'s pages ``ids`` (checked by :meth:`_checked`) as free."""
        self._owner.index_fill_(0, ids, self.FREE)
        self._drop(self._handles[owner], ids.numel())

    def _handle(self, owner: object) -> int:
        h = self._handles.get(owner)
        if h is None:
            if self._spare:
                h = self._spare.pop()
                self._owners[h], self._counts[h] = owner, 0
            else:
                h = len(self._owners)
                self._owners.append(owner)
                self._counts.append(0)
            self._handles[owner] = h
        return h

    def _drop(self, h: int, n: int) -> None:
        self._counts[h] -= n
        assert self._counts[h] >= 0, f"owner {self._owners[h]!r}: page count {self._counts[h]} < 0"
        if self._counts[h] == 0:
            del self._handles[self._owners[h]]
            self._owners[h] = None
            self._spare.append(h)

    def _checked(self, ids: list[int] | torch.Tensor, owner: object, verb: str, call: str) -> torch.Tensor:
        """``ids`` as an int64 tensor, after asserting that ``owner`` holds each of them once."""
        idx = _as_ids(ids)
        if idx.numel() == 0:
            return idx
        h = self._handles.get(owner, -2)  # -2: an owner with no pages matches no page
        if int(idx.min()) >= 0 and int(idx.max()) < self.num_pages:
            got = self._owner.index_select(0, idx)
        else:  # out-of-range ids are owned by nobody
            inside = (idx >= 0) & (idx < self.num_pages)
            got = torch.where(inside, self._owner.index_select(0, idx.clamp(0, self.num_pages - 1)),
                              torch.full_like(idx, -2, dtype=torch.int32))
        bad = (got != h).nonzero()
        if bad.numel():
            j = int(bad[0])
            g = int(got[j])
            who = self._owners[g] if g >= 0 else None
            raise AssertionError(f"page {int(idx[j])} {verb} {owner!r} but owned by {who!r}")
        if torch.unique(idx).numel() != idx.numel():
            raise AssertionError(f"duplicate page ids in one {call}: {sorted(idx.tolist())[:10]}")
        return idx

    # ------------------------------------------------------------------ the full walk
    def check_integrity(self, owned: dict[object, list[int]] | None = None) -> None:
        """Every page is free xor owned once, and the counters agree with the pages;
        optionally the owners' tables agree with the allocator. Walks the whole pool."""
        free = self._stack[:self._top]
        on_free_list = torch.bincount(free, minlength=self.num_pages)  # the stack only ever holds page ids
        distinct = int((on_free_list > 0).sum())
        if distinct != free.numel():
            raise AssertionError(f"free list holds duplicates: {free.numel()} entries, {distinct} distinct")
        held = self._owner != self.FREE
        both = (held & (on_free_list > 0)).nonzero().flatten()
        if both.numel():
            raise AssertionError(f"pages both free and owned: {both[:10].tolist()}")
        n_held = int(held.sum())
        if free.numel() + n_held != self.num_pages:
            raise AssertionError(
                f"page leak: {free.numel()} free + {n_held} owned != {self.num_pages} total"
            )
        per_handle = torch.bincount(self._owner.to(torch.int64) + 1, minlength=len(self._owners) + 1).tolist()[1:]
        counted = {self._owners[h]: c for h, c in enumerate(per_handle) if c}
        if counted != self.owner_counts():
            raise AssertionError(f"owner counters disagree with the pages: counters {self.owner_counts()}, "
                                 f"pages {counted}")
        if owned is not None:
            self._check_tables(owned)

    def _check_tables(self, owned: dict[object, list[int]]) -> None:
        whos = list(owned)
        tables = [_as_ids(owned[w]) for w in whos]
        ids = torch.cat(tables) if tables else torch.zeros(0, dtype=torch.int64)
        inside = (ids >= 0) & (ids < self.num_pages)
        listed = torch.bincount(ids[inside], minlength=self.num_pages)
        outside = ids[~inside].tolist()
        if bool((listed > 1).any()) or len(set(outside)) != len(outside):
            seen: dict[int, object] = {}  # name the first page listed twice, in table order
            for who, t in zip(whos, tables):
                for i in t.tolist():
                    assert i not in seen, f"page {i} in the tables of both {seen[i]!r} and {who!r}"
                    seen[i] = who
        # each page's expected owner handle: FREE in no table, -2 - t in the table of an owner
        # that holds no pages (it matches no page)
        # (pages owned by nobody keep their state: FREE, or a subclass's own, e.g. a borrowing allocator's ABSENT)
        expect = torch.where(self._owner >= 0, torch.full_like(self._owner, self.FREE), self._owner)
        for t, (who, tab) in enumerate(zip(whos, tables)):
            expect.index_fill_(0, tab[(tab >= 0) & (tab < self.num_pages)], self._handles.get(who, -2 - t))
        if not outside and torch.equal(expect, self._owner):
            return
        is_listed = listed > 0
        held = self._owner >= 0
        missing = (held & ~is_listed).nonzero().flatten()[:10].tolist()
        extra = sorted((is_listed & ~held).nonzero().flatten().tolist()[:10] + outside)[:10]
        wrong = (is_listed & held & (expect != self._owner)).nonzero().flatten()[:10].tolist()
        table_of = {i: who for who, t in zip(whos, tables) for i in t.tolist() if i in set(wrong)}
        details = ", ".join(f"page {i}: table says {table_of[i]!r}, allocator "
                            f"{self._owners[int(self._owner[i])]!r}" for i in wrong)
        raise AssertionError(
            f"page tables disagree with the allocator: untracked {missing}, unowned {extra}, "
            f"wrong owner [{details}]")

    def check_counts(self, owned: dict[object, int]) -> None:
        """The counters alone (O(owners), no page walk): the owners holding pages and how many
        are ``owned`` (owner -> pages its table lists; owners with 0 may be left out), and
        free + held pages make the pool."""
        held = sum(self._counts[h] for h in self._handles.values())
        if self._top + held != self.num_pages:
            raise AssertionError(f"page leak: {self._top} free + {held} owned != {self.num_pages} total")
        want = {who: n for who, n in owned.items() if n}
        have = self.owner_counts()
        if want != have:
            diff = sorted(((repr(w), want.get(w, 0), have.get(w, 0)) for w in set(want) | set(have)
                           if want.get(w, 0) != have.get(w, 0)))[:10]
            raise AssertionError("page counts disagree with the allocator: "
                                 + ", ".join(f"{w}: tables {a}, allocator {b}" for w, a, b in diff))


def _as_ids(ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Page ids as a CPU int64 tensor (from a list through ``array``: ~4x faster than
    ``torch.tensor(list)``, which dominated a free of 16k pages).

    The allocator's hot calls use ``index_select``/``index_fill_``, not ``t[idx]``: advanced
    indexing of a few thousand ids goes multi-threaded and, with the CPU cores busy, waited
    ~10 ms per call here (2 cores, 2 torch threads, loaded machine)."""
    if isinstance(ids, torch.Tensor):
        return ids.to("cpu", torch.int64).flatten()
    if len(ids) == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", ids), dtype=torch.int64)


class RaggedHeadKVPool:
    """Page storage. ``k_pages``/``v_pages``: ``[num_pages, page_size, head_dim]`` of ``dtype``.

    Token ``t`` of page ``p`` has the *page address* ``p * page_size + t``; readers and writers
    index :attr:`k_flat`/:attr:`v_flat` ``[N, head_dim]`` at :meth:`physical` of page addresses.
    Here that is the identity (the pages are one tensor of their own, :attr:`contiguous`);
    :class:`~headkv_sglang.kv.shared_memory.SharedPagePool` keeps the pages inside SGLang's
    token slots instead, where ``k_pages``/``v_pages`` do not exist.
    """

    contiguous = True

    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: str | torch.device):
        self.num_pages, self.page_size, self.head_dim = num_pages, page_size, head_dim
        self.dtype = dtype
        self.k_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.k_pages.device

    @property
    def k_flat(self) -> torch.Tensor:
        """``[num_pages * page_size, head_dim]``: every stored K head-vector."""
        return self.k_pages.view(-1, self.head_dim)

    @property
    def v_flat(self) -> torch.Tensor:
        return self.v_pages.view(-1, self.head_dim)

    def physical(self, addr: torch.Tensor) -> torch.Tensor:
        """Rows of :attr:`k_flat`/:attr:`v_flat` of page addresses ``addr`` (int64, any shape)."""
        return addr

    def page_tokens(self, page_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[..., page_size]``: the rows of :attr:`k_flat` holding each page's tokens."""
        t = torch.arange(self.page_size, device=page_ids.device)
        return self.physical(page_ids.to(torch.int64)[..., None] * self.page_size + t)

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.page_size * self.head_dim * self.k_pages.element_size()

    def pages_for(self, lengths: torch.Tensor) -> torch.Tensor:
        """int64 pages needed per row for ``lengths`` tokens."""
        return (lengths + self.page_size - 1) // self.page_size

    def write(self, page_ids: torch.Tensor, kv_indptr: torch.Tensor, lengths: torch.Tensor,
              k_flat: torch.Tensor, v_flat: torch.Tensor, tok_indptr: torch.Tensor) -> None:
        """Copy each row's tokens ``[tok_indptr[h], tok_indptr[h+1])`` of ``k_flat``/``v_flat``
        (``[N, head_dim]``) into its pages ``page_ids[kv_indptr[h]:kv_indptr[h+1]]``; the unused
        slots of a row's last page are zeroed. Two copies for all rows (no loop over rows)."""
        ps, device = self.page_size, self.device
        page_ids = page_ids.to(device, torch.int64)
        if page_ids.numel() == 0:
            return
        lengths = lengths.to(device, torch.int64)
        first_page = kv_indptr[:-1].to(device, torch.int64)
        first_tok = tok_indptr[:-1].to(device, torch.int64)
        # token n of the flat rows: its row, its place in the row, its page and slot
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        j = torch.arange(row.numel(), device=device) - starts[row]
        dest = page_ids[first_page[row] + torch.div(j, ps, rounding_mode="floor")] * ps + j % ps
        src_idx = first_tok[row] + j
        if self.contiguous:
            for pages, src in ((self.k_pages, k_flat), (self.v_pages, v_flat)):
                pages[page_ids] = 0
                pages.view(-1, self.head_dim)[dest] = src.to(device)[src_idx].to(self.dtype)
            return
        every, dest = self.page_tokens(page_ids).flatten(), self.physical(dest)
        for flat, src in ((self.k_flat, k_flat), (self.v_flat, v_flat)):
            flat[every] = 0
            flat[dest] = src.to(device)[src_idx].to(self.dtype)

    def write_values(self, page_ids: torch.Tensor, vo_indptr: torch.Tensor, lengths: torch.Tensor,
                     v_flat: torch.Tensor, tok_indptr: torch.Tensor) -> None:
        """Values-only pages (PoD's sharing rows, no keys): each row's values
        ``v_flat[tok_indptr[h]:tok_indptr[h+1]]`` packed two pages' worth to a page, token
        ``j`` in page ``page_ids[vo_indptr[h] + j // (2 * page_size)]`` at slot ``s = j % (2 *
        page_size)``: ``k_pages`` slot ``s`` for ``s < page_size``, else ``v_pages`` slot
        ``s - page_size`` (:func:`values_only_addresses`)."""
        device = self.device
        page_ids = page_ids.to(device, torch.int64)
        if page_ids.numel() == 0:
            return
        lengths = lengths.to(device, torch.int64)
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        j = torch.arange(row.numel(), device=device) - (torch.cumsum(lengths, 0) - lengths)[row]
        addr, in_v = values_only_addresses(page_ids, vo_indptr[:-1].to(device, torch.int64)[row], j, self.page_size)
        src = v_flat.to(device)[tok_indptr[:-1].to(device, torch.int64)[row] + j].to(self.dtype)
        every, addr = self.page_tokens(page_ids).flatten(), self.physical(addr)
        self.k_flat[every] = 0
        self.v_flat[every] = 0
        self.k_flat[addr[~in_v]] = src[~in_v]
        self.v_flat[addr[in_v]] = src[in_v]

    def gather_padded(self, layer: "LayerPages") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense view of one layer's rows for the torch reference path.

        Returns ``k, v`` ``[H, max_pages*page_size, head_dim]`` and a bool mask ``[H, max_len]``
        of valid tokens.
        """
        H = layer.lengths.numel()
        counts = layer.kv_indptr[1:] - layer.kv_indptr[:-1]
        max_pages = int(counts.max()) if H else 0
        idx = torch.zeros(H, max(max_pages, 1), dtype=torch.int64)
        for h in range(H):
            c = int(counts[h])
            idx[h, :c] = layer.kv_indices[int(layer.kv_indptr[h]):int(layer.kv_indptr[h]) + c]
        L = max(max_pages, 1) * self.page_size
        idx = idx.to(self.k_pages.device)
        k = self.k_pages[idx].view(H, L, self.head_dim)
        v = self.v_pages[idx].view(H, L, self.head_dim)
        mask = torch.arange(L, device=k.device)[None, :] < layer.lengths.to(k.device)[:, None]
        return k, v, mask


def values_only_addresses(page_ids: torch.Tensor, first_page: torch.Tensor, j: torch.Tensor,
                          page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token addresses of values-only tokens ``j`` (a row's ``j``-th, its pages starting
    at ``page_ids[first_page]``) and whether each lies in ``v_pages`` (else ``k_pages``)."""
    ps2 = 2 * page_size
    page = page_ids[first_page + torch.div(j, ps2, rounding_mode="floor")]
    slot = j % ps2
    in_v = slot >= page_size
    return page * page_size + torch.where(in_v, slot - page_size, slot), in_v


@dataclass
class LayerPages:
    """One layer's rows. ``kv_indptr`` int64 ``[H+1]`` over ``kv_indices`` int64 ``[pages]``;
    ``lengths`` int64 ``[H]`` tokens per row; compensation (Razor) ``comp_k``/``comp_v``
    ``[H, head_dim]`` and ``comp_count`` int64 ``[H]`` or None.

    PoD's sharing rows also hold *values-only* tokens (``vo_*``, None elsewhere): row ``h``'s
    are ``vo_lengths[h]`` tokens in pages ``vo_indices[vo_indptr[h]:vo_indptr[h+1]]``, two
    pages' worth each (:meth:`RaggedHeadKVPool.write_values`); their keys are those of the
    same head's row in the layer below at tokens ``vo_start[h] .. vo_start[h] +
    vo_lengths[h] - 1`` (``vo_start[h] == -1``: the row below's own values-only tokens, whose
    keys come from further down: a PoD group of more than two layers). Their logits are this
    layer's queries against those keys (``vo_own_queries``, PoD's key sharing) or the
    group's first layer's logits. They sit, by position, between the row's first
    ``vo_start[h]`` tokens and the rest (``lengths`` counts only the whole tokens)."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    lengths: torch.Tensor
    comp_k: torch.Tensor | None = None
    comp_v: torch.Tensor | None = None
    comp_count: torch.Tensor | None = None
    vo_indptr: torch.Tensor | None = None
    vo_indices: torch.Tensor | None = None
    vo_lengths: torch.Tensor | None = None
    vo_start: torch.Tensor | None = None
    vo_own_queries: bool = False

    @property
    def kv_last_page_len(self) -> torch.Tensor:
        return torch.where(self.lengths == 0, torch.zeros_like(self.lengths), (self.lengths - 1) % self._page_size + 1)

    _page_size: int = 1


#: ``RequestPages.decode_retry_at`` after a failed decode move: its tail stays whole from then on.
DECODE_OFF = 1 << 62


@dataclass
class RequestPages:
    """A compressed request: positions ``[0, tail_start)`` live in the pool, its *tail*
    ``[tail_start, seq_len)`` in SGLang's token pool.

    ``tail_start`` is ``prompt_len`` until decode-phase compression
    (``policies/decode.py``) moves generated tokens into the pages: each (layer, KV head)
    row then holds its kept prompt tokens followed by ``decode_kept`` generated ones (the
    same number for every row). A record is never changed in place once attention kernels
    may have planned with it: decode compression makes a new one.

    A request that reuses a shared compressed prompt (``kv_share``) has the shared one's
    ``layers`` and ``prompt_len`` (the shared prefix's length: the rest of its prompt is its
    tail), owns no pages (``page_ids == []``) and names their owner in ``shared``.
    """

    prompt_len: int
    policy: str
    budget: int
    layers: list[LayerPages] = field(default_factory=list)
    page_ids: list[int] = field(default_factory=list)
    kept_tokens: int = 0  # prompt tokens kept, summed over layers and heads
    compress_ms: float = 0.0  # wall time of its compression, scoring to page writes
    # question-agnostic scores ranked its tokens across all (layer, KV head) rows ("global") or
    # within each row's policy budget ("policy"); None: question or window queries, or positions
    selection: str | None = None
    tail_start: int = -1  # -1: prompt_len
    decode_budget: int = 0  # generated tokens kept per (layer, KV head); 0: decode compression off
    decode_window: int = 0  # recent generated tokens always left whole in the tail (and scoring)
    decode_kept: int = 0  # generated tokens held in every row's pages
    decode_pages: int = 0  # pages added to the prompt's for them
    decode_compressions: int = 0
    decode_retry_at: int = 0  # after a full pool: no new try before this sequence length (DECODE_OFF: never)
    decode_recency: bool = False  # a position-based policy: the newest generated tokens are kept
    decode_merge: bool = False  # D2O: dropped generated tokens merge into similar kept ones
    decode_thresholds: tuple = ()  # D2O: each layer's merge threshold after the last move (None: none yet)
    shared: object = None  # a SharedPrefix (kv/manager.py) whose pages these are; page_ids is then []

    @property
    def moves_decode(self) -> bool:
        """Its generated tokens still move into pages (a decode budget, and no failed move)."""
        return self.decode_budget > 0 and self.decode_retry_at < DECODE_OFF

    def __post_init__(self) -> None:
        if self.tail_start < 0:
            self.tail_start = self.prompt_len

    def held_bytes(self, bytes_per_page: int) -> int:
        return len(self.page_ids) * bytes_per_page
