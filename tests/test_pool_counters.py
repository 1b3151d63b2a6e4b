"""PageAllocator's counters against a naive reference, and /server_info's O(requests) check
(CPU, fast, no server).

The allocator keeps its bookkeeping in arrays and per-owner counters so that the serving
layer can report without walking ~3M pages; these tests hold the counters to a plain
Python model of the same free list (the allocator as it was: a list and a dict per page)
and to the full walk, and check that ``serving.metrics.report`` only walks the pages when
``HEADKV_SGLANG_CHECK_INTEGRITY=1`` asks for it.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from headkv_sglang.config import KVPolicyConfig, ModelShape
from headkv_sglang.kv.manager import CompressionManager
from headkv_sglang.kv.pool import PageAllocator, PoolFullError, RequestPages
from headkv_sglang.serving import metrics
from headkv_sglang.serving.state import ServingState


class NaiveAllocator:
    """The reference: a Python free list popped from the end, a dict page -> owner."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, -1, -1))
        self.owner: dict[int, object] = {}

    def allocate(self, n: int, owner: object) -> list[int]:
        ids = [self.free.pop() for _ in range(n)]
        for i in ids:
            self.owner[i] = owner
        return ids

    def release(self, ids: list[int]) -> None:
        for i in ids:
            del self.owner[i]
            self.free.append(i)

    def transfer(self, ids: list[int], new_owner: object) -> None:
        for i in ids:
            self.owner[i] = new_owner

    def counts(self) -> dict[object, int]:
        out: dict[object, int] = {}
        for who in self.owner.values():
            out[who] = out.get(who, 0) + 1
        return out


@pytest.mark.parametrize("num_pages", [1, 7, 97, 1031])
def test_counters_match_the_naive_allocator_and_the_walk(num_pages):
    """Random allocate / free (whole or in parts, any order) / transfer by several owners:
    the same page ids as the reference, and free_pages, used_pages, pages_of and
    owner_counts equal the reference's counts and the full walk's at every step."""
    rng = random.Random(num_pages * 31 + 5)
    a, ref = PageAllocator(num_pages), NaiveAllocator(num_pages)
    held: dict[object, list[int]] = {}
    owners = [0, 1, 2, "shared-a", ("probe", 3), 17]
    for step in range(400):
        who = rng.choice(owners)
        op = rng.random()
        if op < 0.45:
            n = rng.randint(0, max(1, num_pages // 4))
            if a.can_allocate(n):
                got = a.allocate(n, owner=who)
                assert got == ref.allocate(n, who), f"step {step}: ids differ from the reference"
                held.setdefault(who, []).extend(got)
            else:
                assert n > len(ref.free)
                with pytest.raises(PoolFullError):
                    a.allocate(n, owner=who)
        elif op < 0.8 and held.get(who):
            ids = held[who]
            part = rng.sample(ids, rng.randint(1, len(ids)))  # a part of them, any order
            a.free(part if rng.random() < 0.5 else torch.tensor(part), owner=who)
            ref.release(part)
            held[who] = [i for i in ids if i not in set(part)]
        elif held.get(who):
            new = rng.choice([o for o in owners if o != who])
            ids = held.pop(who)
            a.transfer(ids, who, new)
            ref.transfer(ids, new)
            held.setdefault(new, []).extend(ids)
        counts = ref.counts()
        assert a.free_pages == len(ref.free), f"step {step}"
        assert a.used_pages == num_pages - len(ref.free), f"step {step}"
        assert a.owner_counts() == counts, f"step {step}: {a.owner_counts()} vs {counts}"
        for o in owners:
            assert a.pages_of(o) == counts.get(o, 0), f"step {step}: owner {o!r}"
        a.check_integrity({o: ids for o, ids in held.items() if ids})
        a.check_counts({o: len(ids) for o, ids in held.items()})
    # the free list itself is the reference's: what is handed out next is the same
    rest = len(ref.free)
    assert a.allocate(rest, owner="rest") == ref.allocate(rest, "rest")


def test_counters_and_handles_are_recycled():
    """An owner that gives back its last page is forgotten (its handle reused): the
    counters do not grow with the number of requests ever served."""
    a = PageAllocator(50)
    for idx in range(300):
        ids = a.allocate(3 + idx % 5, owner=idx)
        a.free(ids[:1], owner=idx)
        a.free(ids[1:], owner=idx)
        assert a.pages_of(idx) == 0
    assert a.owner_counts() == {} and len(a._owners) == 1, a._owners
    a.check_integrity({})


def test_check_counts_detects_a_leak_and_a_wrong_count():
    a = PageAllocator(20)
    ids_a = a.allocate(4, owner="A")
    ids_b = a.allocate(3, owner="B")
    a.check_counts({"A": 4, "B": 3, "C": 0})
    with pytest.raises(AssertionError, match=re.escape("'B': tables 0, allocator 3")):
        a.check_counts({"A": 4})  # B holds pages no table lists
    with pytest.raises(AssertionError, match=re.escape("'A': tables 3, allocator 4")):
        a.check_counts({"A": 3, "B": 3})
    with pytest.raises(AssertionError, match="freed by 'A' but owned by 'B'"):
        a.free(ids_a + ids_b[:1], owner="A")
    a.check_counts({"A": 4, "B": 3})


def test_the_walk_detects_counters_that_disagree_with_the_pages():
    a = PageAllocator(10)
    a.allocate(3, owner="A")
    a.check_integrity()
    a._counts[a._handles["A"]] += 1  # a counter that drifted from the pages
    with pytest.raises(AssertionError, match="owner counters disagree with the pages"):
        a.check_integrity()


def test_transfer_rejects_foreign_and_duplicate_pages_unchanged():
    a = PageAllocator(9)
    ids = a.allocate(3, owner="A")
    other = a.allocate(2, owner="B")
    with pytest.raises(AssertionError, match=re.escape(f"page {other[0]} handed over by 'A' but owned by 'B'")):
        a.transfer([*ids, other[0]], "A", "S")
    with pytest.raises(AssertionError, match="duplicate page ids in one transfer"):
        a.transfer([ids[0], ids[0]], "A", "S")
    with pytest.raises(AssertionError, match=re.escape("page 99 freed by 'A' but owned by None")):
        a.free([ids[0], 99], owner="A")
    assert a.owner_counts() == {"A": 3, "B": 2}
    a.check_integrity({"A": ids, "B": other})


# --------------------------------------------------------------------------- #
# /server_info: the counters, not the walk (unless asked)
# --------------------------------------------------------------------------- #
SHAPE = ModelShape(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=1)


def _served_manager(num_pages: int, requests: int, pages: int) -> CompressionManager:
    m = CompressionManager(SHAPE, num_pages, 1, torch.float16, "cpu")
    for idx in range(requests):
        ids = m.allocator.allocate(pages + idx % 3, owner=idx)
        m.install_record(idx, RequestPages(prompt_len=100, policy="snapkv", budget=8, page_ids=ids))
    return m


@pytest.fixture
def walks(monkeypatch):
    """Counts CompressionManager.check_integrity calls (the walk still runs)."""
    calls = []
    real = CompressionManager.check_integrity

    def counted(self):
        calls.append(self)
        return real(self)

    monkeypatch.setattr(CompressionManager, "check_integrity", counted)
    monkeypatch.delenv(metrics.CHECK_INTEGRITY_ENV, raising=False)
    return calls


def test_server_info_checks_counters_without_walking_the_pages(walks, monkeypatch):
    m = _served_manager(997, 11, 13)
    state = ServingState(cfg=KVPolicyConfig(policy="snapkv"), manager=m)
    out = metrics.report(state)
    assert walks == [], "report() walked every page without HEADKV_SGLANG_CHECK_INTEGRITY"
    assert (out["integrity"], out["integrity_check"]) == ("ok", "counts"), out["integrity"]
    assert out["pool"]["used_pages"] == sum(13 + i % 3 for i in range(11))
    for off in ("0", "", "off"):
        monkeypatch.setenv(metrics.CHECK_INTEGRITY_ENV, off)
        metrics.report(state)
    assert walks == []
    monkeypatch.setenv(metrics.CHECK_INTEGRITY_ENV, "1")
    out = metrics.report(state)
    assert walks == [m] and (out["integrity"], out["integrity_check"]) == ("ok", "pages")


@pytest.mark.parametrize("walk", ["0", "1"])
def test_server_info_reports_a_leak_either_way(walks, monkeypatch, walk):
    """A request whose table lost a page (the page is held, no table lists it)."""
    monkeypatch.setenv(metrics.CHECK_INTEGRITY_ENV, walk)
    m = _served_manager(211, 5, 7)
    m.records[3].page_ids = m.records[3].page_ids[:-1]
    out = metrics.report(ServingState(cfg=KVPolicyConfig(policy="snapkv"), manager=m))
    assert out["integrity"].startswith("FAILED"), out["integrity"]
    assert ("untracked" if walk == "1" else "3: tables 6, allocator 7") in out["integrity"], out["integrity"]


def test_server_info_counts_shared_prefixes(walks):
    """Pages handed to a shared prefix count under the prefix, not the request."""
    m = _served_manager(300, 3, 10)
    m.publish(1, key="k", ids=list(range(100)))
    state = ServingState(cfg=KVPolicyConfig(policy="snapkv"), manager=m)
    assert metrics.report(state)["integrity"] == "ok"
    assert walks == []
    m.check_integrity()
    (entry,) = m.shared_prefixes()
    assert m.allocator.pages_of(entry) == 11 and m.allocator.pages_of(1) == 0


def test_a_bad_switch_value_is_named(walks, monkeypatch):
    monkeypatch.setenv(metrics.CHECK_INTEGRITY_ENV, "maybe")
    out = metrics.report(ServingState(cfg=KVPolicyConfig(policy="snapkv"), manager=_served_manager(40, 1, 2)))
    assert "HEADKV_SGLANG_CHECK_INTEGRITY='maybe': expected 1" in out["integrity"], out["integrity"]
