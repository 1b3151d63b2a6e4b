"""Shared compressed prompts (``kv_share``): the registry of :class:`SharedPrefix` entries.

A compressed request's pages can be handed to a :class:`SharedPrefix` (the manager's
``publish``); a later request whose prompt extends that prompt under the same config
reads them. A shared prefix is reference-counted by the rows reading it (``refs``); with
none it stays as cache and is evicted, least recently used first, when pages are needed.
The registry only keeps the entries; which rows read them is the request states'
(:mod:`headkv_sglang.kv.request_state`), kept in step by the manager.
Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from headkv_sglang.kv.pool import PageAllocator, RequestPages


@dataclass(eq=False)
class SharedPrefix:
    """A compressed prompt that requests extending it reuse; it owns the pages."""

    key: object  # the config it was compressed under (serving: requests.share_key)
    ids: tuple[int, ...]  # its tokens
    record: RequestPages  # its pages (owned by this object in the allocator)
    refs: set = field(default_factory=set)  # rows reading it (pinned or adopted)
    last_used: int = 0
    adoptions: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # the allocator names owners in its errors
        return f"SharedPrefix({self.record.policy}, {self.length} tokens, {len(self.record.page_ids)} pages)"


class SharedRegistry:
    """``(key, length) -> tokens -> SharedPrefix``, with LRU eviction of unread entries."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self._tables: dict[tuple, dict[tuple, SharedPrefix]] = {}
        self.generation = 0  # bumped whenever a shared prefix appears or goes
        self.totals: dict[str, int] = defaultdict(int)
        self._tick = 0

    def touch(self, entry: SharedPrefix) -> None:
        self._tick += 1
        entry.last_used = self._tick

    def find(self, key: object, ids) -> SharedPrefix | None:
        """The longest entry compressed under ``key`` whose tokens begin ``ids``."""
        best = None
        for (k, n), table in self._tables.items():
            if n <= len(ids) and (best is None or n > best.length) and k == key:
                best = table.get(tuple(ids[:n]), best)
        return best

    def contains(self, entry: SharedPrefix) -> bool:
        return self._tables.get((entry.key, entry.length), {}).get(entry.ids) is entry

    def has(self, key: object, ids: tuple) -> bool:
        return ids in self._tables.get((key, len(ids)), {})

    def add(self, entry: SharedPrefix) -> None:
        self._tables.setdefault((entry.key, entry.length), {})[entry.ids] = entry
        self.touch(entry)
        self.generation += 1
        self.totals["published"] += 1

    def entries(self) -> list[SharedPrefix]:
        return [e for t in self._tables.values() for e in t.values()]

    def evictable_pages(self) -> int:
        """Pages of entries no row reads (they are freed when pages are needed)."""
        return sum(len(e.record.page_ids) for e in self.entries() if not e.refs)

    def drop(self, entry: SharedPrefix) -> int:
        """Free an unread entry's pages; returns how many."""
        if entry.refs:
            raise ValueError(f"{entry!r} is read by rows {sorted(entry.refs)}")
        table = self._tables.get((entry.key, entry.length), {})
        if table.get(entry.ids) is not entry:
            return 0
        del table[entry.ids]
        if not table:
            del self._tables[(entry.key, entry.length)]
        self.allocator.free(entry.record.page_ids, owner=entry)
        self.generation += 1
        self.totals["evicted"] += 1
        return len(entry.record.page_ids)

    def evict(self, need: int) -> int:
        """Free unread entries, least recently used first, until ``need`` pages are free (or
        none is left to free). Returns the pages freed."""
        if self.allocator.can_allocate(need):
            return 0
        freed = 0
        for e in sorted((e for e in self.entries() if not e.refs), key=lambda e: e.last_used):
            if self.allocator.can_allocate(need):
                break
            freed += self.drop(e)
        return freed

    def clear(self) -> int:
        """Free every unread entry; returns the pages freed."""
        return sum(self.drop(e) for e in self.entries() if not e.refs)
