"""RaggedHeadKVPool: compressed prompt KV in pages that each belong to one (layer, KV head).

Three pieces, kept apart:

* :class:`RaggedHeadKVPool` — storage: ``k_pages``/``v_pages`` ``[num_pages, page_size, head_dim]``.
* :class:`PageAllocator` — ownership: a free list with check/act pairs and
  :meth:`PageAllocator.check_integrity`.
* :class:`LayerPages` / :class:`RequestPages` — one request's page table, in FlashInfer's
  CSR terms: for layer ``l`` the row of KV head ``h`` is pages
  ``kv_indices[kv_indptr[h]:kv_indptr[h+1]]`` holding ``lengths[h]`` tokens, the last
  page holding ``kv_last_page_len[h]``. Each (request, KV head) is one row of a
  ``num_kv_heads=1`` paged batch on the GPU.

Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PoolFullError(RuntimeError):
    """The compressed pool has fewer free pages than asked for."""


class PageAllocator:
    """Free-list page allocator. Page ids are ``0 .. num_pages-1``."""

    def __init__(self, num_pages: int) -> None:
        assert num_pages > 0, f"num_pages must be > 0, got {num_pages}"
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._owner: dict[int, object] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int, owner: object) -> list[int]:
        if not self.can_allocate(n):
            raise PoolFullError(f"asked for {n} pages, {len(self._free)} of {self.num_pages} free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._owner[i] = owner
        return ids

    def free(self, ids: list[int], owner: object) -> None:
        # check every page first: a rejected free must leave the allocator unchanged
        for i in ids:
            got = self._owner.get(i)
            assert got == owner, f"page {i} freed by {owner!r} but owned by {got!r}"
        assert len(set(ids)) == len(ids), f"duplicate page ids in one free: {sorted(ids)[:10]}"
        for i in ids:
            del self._owner[i]
            self._free.append(i)

    def transfer(self, ids: list[int], owner: object, new_owner: object) -> None:
        """Hand ``owner``'s pages ``ids`` to ``new_owner`` (a request's compressed prompt
        becoming a shared one)."""
        for i in ids:
            got = self._owner.get(i)
            assert got == owner, f"page {i} handed over by {owner!r} but owned by {got!r}"
        for i in ids:
            self._owner[i] = new_owner

    def check_integrity(self, owned: dict[object, list[int]] | None = None) -> None:
        """Every page is free xor owned once; optionally the owners' tables agree."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError(f"free list holds duplicates: {len(self._free)} entries, {len(free)} distinct")
        if free & self._owner.keys():
            raise AssertionError(f"pages both free and owned: {sorted(free & self._owner.keys())[:10]}")
        if len(free) + len(self._owner) != self.num_pages:
            raise AssertionError(
                f"page leak: {len(free)} free + {len(self._owner)} owned != {self.num_pages} total"
            )
        if owned is not None:
            expect: dict[int, object] = {}
            for who, ids in owned.items():
                for i in ids:
                    assert i not in expect, f"page {i} in the tables of both {expect[i]!r} and {who!r}"
                    expect[i] = who
            if expect != self._owner:
                missing = sorted(set(self._owner) - set(expect))[:10]
                extra = sorted(set(expect) - set(self._owner))[:10]
                wrong = sorted(i for i in set(expect) & set(self._owner) if expect[i] != self._owner[i])[:10]
                details = ", ".join(f"page {i}: table says {expect[i]!r}, allocator {self._owner[i]!r}" for i in wrong)
                raise AssertionError(
                    f"page tables disagree with the allocator: untracked {missing}, unowned {extra}, "
                    f"wrong owner [{details}]")


class RaggedHeadKVPool:
    """Page storage. ``k_pages``/``v_pages``: ``[num_pages, page_size, head_dim]`` of ``dtype``."""

    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: str | torch.device):
        self.num_pages, self.page_size, self.head_dim = num_pages, page_size, head_dim
        self.dtype = dtype
        self.k_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)

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
        ps, device = self.page_size, self.k_pages.device
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
        for pages, src in ((self.k_pages, k_flat), (self.v_pages, v_flat)):
            pages[page_ids] = 0
            pages.view(-1, self.head_dim)[dest] = src.to(device)[src_idx].to(self.dtype)

    def write_values(self, page_ids: torch.Tensor, vo_indptr: torch.Tensor, lengths: torch.Tensor,
                     v_flat: torch.Tensor, tok_indptr: torch.Tensor) -> None:
        """Values-only pages (PoD's sharing rows, no keys): each row's values
        ``v_flat[tok_indptr[h]:tok_indptr[h+1]]`` packed two pages' worth to a page, token
        ``j`` in page ``page_ids[vo_indptr[h] + j // (2 * page_size)]`` at slot ``s = j % (2 *
        page_size)``: ``k_pages`` slot ``s`` for ``s < page_size``, else ``v_pages`` slot
        ``s - page_size`` (:func:`values_only_addresses`)."""
        device = self.k_pages.device
        page_ids = page_ids.to(device, torch.int64)
        if page_ids.numel() == 0:
            return
        lengths = lengths.to(device, torch.int64)
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        j = torch.arange(row.numel(), device=device) - (torch.cumsum(lengths, 0) - lengths)[row]
        addr, in_v = values_only_addresses(page_ids, vo_indptr[:-1].to(device, torch.int64)[row], j, self.page_size)
        src = v_flat.to(device)[tok_indptr[:-1].to(device, torch.int64)[row] + j].to(self.dtype)
        self.k_pages[page_ids] = 0
        self.v_pages[page_ids] = 0
        self.k_pages.view(-1, self.head_dim)[addr[~in_v]] = src[~in_v]
        self.v_pages.view(-1, self.head_dim)[addr[in_v]] = src[in_v]

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
    pages' worth each (:meth:`RaggedHeadKVPool.write_values`); their logits are those of
    the same head's row in the layer below at tokens ``vo_start[h] ..
    vo_start[h] + vo_lengths[h] - 1``. They sit, by position, between the row's first
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

    @property
    def kv_last_page_len(self) -> torch.Tensor:
        return torch.where(self.lengths == 0, torch.zeros_like(self.lengths), (self.lengths - 1) % self._page_size + 1)

    _page_size: int = 1


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
    tail_start: int = -1  # -1: prompt_len
    decode_budget: int = 0  # generated tokens kept per (layer, KV head); 0: decode compression off
    decode_window: int = 0  # recent generated tokens always left whole in the tail (and scoring)
    decode_kept: int = 0  # generated tokens held in every row's pages
    decode_pages: int = 0  # pages added to the prompt's for them
    decode_compressions: int = 0
    decode_retry_at: int = 0  # after a full pool: no new try before this sequence length
    decode_recency: bool = False  # a position-based policy: the newest generated tokens are kept
    decode_merge: bool = False  # D2O: dropped generated tokens merge into similar kept ones
    decode_thresholds: tuple = ()  # D2O: each layer's merge threshold after the last move (None: none yet)
    shared: object = None  # a SharedPrefix (kv/manager.py) whose pages these are; page_ids is then []

    def __post_init__(self) -> None:
        if self.tail_start < 0:
            self.tail_start = self.prompt_len

    def held_bytes(self, bytes_per_page: int) -> int:
        return len(self.page_ids) * bytes_per_page
