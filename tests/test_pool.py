"""RaggedHeadKVPool storage, PageAllocator ownership and the CSR page tables (CPU, fast)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from headkv_sglang.kv.pool import LayerPages, PageAllocator, PoolFullError, RaggedHeadKVPool, RequestPages
from headkv_sglang.reference import paged_to_flat


# --------------------------------------------------------------------------- #
# PageAllocator
# --------------------------------------------------------------------------- #
def test_allocator_hands_out_low_ids_first_and_counts():
    a = PageAllocator(7)
    assert (a.free_pages, a.used_pages) == (7, 0)
    assert a.allocate(3, owner="A") == [0, 1, 2]
    assert a.allocate(0, owner="B") == []
    assert (a.free_pages, a.used_pages) == (4, 3)
    a.check_integrity({"A": [0, 1, 2]})


@pytest.mark.parametrize("num_pages", [1, 13, 97])
def test_allocator_random_round_trips(num_pages):
    """Random allocate/free by several owners: ids unique, in range, counts and tables agree."""
    rng = random.Random(num_pages)
    a = PageAllocator(num_pages)
    held: dict[str, list[int]] = {}
    for step in range(200):
        owner = f"r{rng.randrange(5)}"
        if owner in held and rng.random() < 0.5:
            ids = held.pop(owner)
            a.free(rng.sample(ids, len(ids)), owner=owner)  # any order
        elif owner not in held:
            n = rng.randint(0, max(1, num_pages // 3))
            if a.can_allocate(n):
                ids = a.allocate(n, owner=owner)
                assert len(ids) == n
                assert all(0 <= i < num_pages for i in ids), ids
                held[owner] = ids
        in_use = [i for ids in held.values() for i in ids]
        assert len(set(in_use)) == len(in_use), f"step {step}: a page handed out twice: {held}"
        assert a.used_pages == len(in_use)
        assert a.free_pages == num_pages - len(in_use)
        a.check_integrity(held)
    for owner, ids in list(held.items()):
        a.free(ids, owner=owner)
        del held[owner]
    assert a.free_pages == num_pages and a.used_pages == 0
    a.check_integrity({})
    # Everything handed back can be handed out again, and nothing more.
    assert sorted(a.allocate(num_pages, owner="all")) == list(range(num_pages))
    assert not a.can_allocate(1)


def test_can_allocate_and_allocate_agree():
    a = PageAllocator(9)
    a.allocate(4, owner="A")
    for n in range(-2, 9):
        before = a.free_pages
        ok = a.can_allocate(n)
        assert ok == (0 <= n <= 5), n
        if ok:
            ids = a.allocate(n, owner=("probe", n))
            assert len(ids) == n
            a.free(ids, owner=("probe", n))
        else:
            with pytest.raises(PoolFullError):
                a.allocate(n, owner=("probe", n))
        assert a.free_pages == before, f"allocate({n}) changed the free count"
    a.check_integrity()


def test_pool_full_error_names_the_counts():
    a = PageAllocator(8)
    a.allocate(5, owner="A")
    with pytest.raises(PoolFullError, match=re.escape("asked for 4 pages, 3 of 8 free")):
        a.allocate(4, owner="B")
    assert a.free_pages == 3
    a.check_integrity({"A": [0, 1, 2, 3, 4]})


def test_check_integrity_detects_leaked_page():
    """A request that owns pages but that no page table lists: its pages are 'untracked'."""
    a = PageAllocator(10)
    ids_a = a.allocate(3, owner="A")
    ids_b = a.allocate(2, owner="B")
    a.check_integrity({"A": ids_a, "B": ids_b})
    with pytest.raises(AssertionError, match=re.escape(f"untracked {sorted(ids_b)}, unowned []")):
        a.check_integrity({"A": ids_a})
    # A table that lost one page of its request.
    with pytest.raises(AssertionError, match=re.escape(f"untracked [{ids_a[-1]}], unowned []")):
        a.check_integrity({"A": ids_a[:-1], "B": ids_b})


def test_double_free_is_rejected_and_harmless():
    a = PageAllocator(6)
    ids = a.allocate(2, owner="A")
    a.free(ids, owner="A")
    with pytest.raises(AssertionError, match=re.escape(f"page {ids[0]} freed by 'A' but owned by None")):
        a.free(ids, owner="A")
    assert a.free_pages == 6
    a.check_integrity({})


def test_check_integrity_detects_table_listing_a_freed_page():
    """A table still listing pages after they were freed (a double free waiting to happen)."""
    a = PageAllocator(6)
    ids = a.allocate(2, owner="A")
    keep = a.allocate(1, owner="B")
    a.free(ids, owner="A")
    with pytest.raises(AssertionError, match=re.escape(f"untracked [], unowned {sorted(ids)}")):
        a.check_integrity({"A": ids, "B": keep})


def test_check_integrity_detects_page_in_two_tables():
    a = PageAllocator(8)
    ids_a = a.allocate(3, owner="A")
    ids_b = a.allocate(3, owner="B")
    with pytest.raises(AssertionError, match=re.escape(f"page {ids_a[1]} in the tables of both 'A' and 'B'")):
        a.check_integrity({"A": ids_a, "B": ids_b + [ids_a[1]]})
    with pytest.raises(AssertionError, match=re.escape(f"page {ids_b[0]} in the tables of both 'B' and 'B'")):
        a.check_integrity({"A": ids_a, "B": ids_b + [ids_b[0]]})


def test_free_by_wrong_owner_is_rejected():
    a = PageAllocator(4)
    ids = a.allocate(2, owner="A")
    with pytest.raises(AssertionError, match=re.escape(f"page {ids[0]} freed by 'B' but owned by 'A'")):
        a.free(ids, owner="B")


def test_rejected_free_leaves_the_allocator_unchanged():
    a = PageAllocator(6)
    ids = a.allocate(2, owner="A")
    other = a.allocate(1, owner="B")
    with pytest.raises(AssertionError):
        a.free(ids, owner="B")
    a.check_integrity({"A": ids, "B": other})
    # One foreign page in the list: nothing of it is freed, not even A's own pages before it.
    with pytest.raises(AssertionError, match=re.escape(f"page {other[0]} freed by 'A' but owned by 'B'")):
        a.free([*ids, other[0]], owner="A")
    assert a.free_pages == 3
    a.check_integrity({"A": ids, "B": other})
    # The same page twice in one call.
    with pytest.raises(AssertionError, match="duplicate page ids in one free"):
        a.free([ids[0], ids[0]], owner="A")
    a.check_integrity({"A": ids, "B": other})
    a.free(ids, owner="A")
    a.free(other, owner="B")
    assert a.free_pages == 6
    a.check_integrity({})


def test_check_integrity_names_page_listed_under_wrong_owner():
    a = PageAllocator(6)
    ids_a = a.allocate(2, owner="A")
    ids_b = a.allocate(2, owner="B")
    with pytest.raises(AssertionError) as err:
        a.check_integrity({"A": [ids_a[0], ids_b[0]], "B": [ids_a[1], ids_b[1]]})
    msg = str(err.value)
    assert f"page {ids_b[0]}: table says 'A', allocator 'B'" in msg, msg
    assert f"page {ids_a[1]}: table says 'B', allocator 'A'" in msg, msg


# --------------------------------------------------------------------------- #
# RaggedHeadKVPool
# --------------------------------------------------------------------------- #
def _write_rows(pool: RaggedHeadKVPool, alloc: PageAllocator, lengths: list[int], head_dim: int,
                gen: torch.Generator, src_dtype=torch.float32):
    """Random rows written into shuffled pages; returns (layer, k rows, v rows)."""
    lens = torch.tensor(lengths, dtype=torch.int64)
    pages = pool.pages_for(lens)
    ids = alloc.allocate(int(pages.sum()), owner="req")
    random.Random(len(ids)).shuffle(ids)  # exercise kv_indices, not just contiguous pages
    kv_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(pages, 0, out=kv_indptr[1:])
    tok_indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=tok_indptr[1:])
    n = int(lens.sum())
    k_flat = torch.randn(n, head_dim, generator=gen).to(src_dtype)
    v_flat = torch.randn(n, head_dim, generator=gen).to(src_dtype)
    kv_indices = torch.tensor(ids, dtype=torch.int64)
    pool.write(kv_indices, kv_indptr, lens, k_flat, v_flat, tok_indptr)
    layer = LayerPages(kv_indptr=kv_indptr, kv_indices=kv_indices, lengths=lens, _page_size=pool.page_size)
    k_rows = [k_flat[int(tok_indptr[h]):int(tok_indptr[h + 1])] for h in range(len(lengths))]
    v_rows = [v_flat[int(tok_indptr[h]):int(tok_indptr[h + 1])] for h in range(len(lengths))]
    return layer, k_rows, v_rows


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_write_then_gather_padded_rebuilds_every_row(page_size, head_dim):
    torch.manual_seed(page_size * 100 + head_dim)
    gen = torch.Generator().manual_seed(page_size * 7 + head_dim)
    lengths = [0, 1, 7, 54, 97, 0, 16, 48, 301, 3]
    pool = RaggedHeadKVPool(200 + 301 // page_size * 2, page_size, head_dim, torch.float32, "cpu")
    alloc = PageAllocator(pool.num_pages)
    layer, k_rows, v_rows = _write_rows(pool, alloc, lengths, head_dim, gen)

    k, v, mask = pool.gather_padded(layer)
    max_pages = max(-(-n // page_size) for n in lengths)
    assert k.shape == v.shape == (len(lengths), max_pages * page_size, head_dim)
    assert mask.shape == (len(lengths), max_pages * page_size)
    for h, n in enumerate(lengths):
        assert mask[h].sum() == n and mask[h, :n].all(), f"row {h}: mask {mask[h].nonzero().flatten().tolist()}"
        assert torch.equal(k[h, :n], k_rows[h]), f"row {h} (len {n}) keys differ"
        assert torch.equal(v[h, :n], v_rows[h]), f"row {h} (len {n}) values differ"

    # The FlashInfer view of the same table (indptr, indices, last_page_len) rebuilds the rows too.
    for pages, rows in ((pool.k_pages, k_rows), (pool.v_pages, v_rows)):
        flat, indptr = paged_to_flat(pages, layer.kv_indptr, layer.kv_indices, layer.kv_last_page_len)
        assert indptr.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert torch.equal(flat, torch.cat(rows))

    # Pages nobody wrote, and the padding of each last page, stay zero.
    used = set(layer.kv_indices.tolist())
    untouched = [p for p in range(pool.num_pages) if p not in used]
    assert not pool.k_pages[untouched].any() and not pool.v_pages[untouched].any()
    for h, n in enumerate(lengths):
        c = -(-n // page_size)
        assert not k[h, n:c * page_size].any() and not v[h, n:c * page_size].any(), f"row {h}: padding not zero"


@pytest.mark.parametrize("page_size", [1, 5])
def test_write_over_reused_pages_zeroes_their_padding_and_touches_no_other_page(page_size):
    """Pages come back dirty from earlier requests: the write clears their unused slots and
    leaves every page it was not given alone."""
    gen = torch.Generator().manual_seed(page_size)
    pool = RaggedHeadKVPool(90, page_size, 8, torch.float32, "cpu")
    pool.k_pages.fill_(7.0)
    pool.v_pages.fill_(-7.0)
    layer, k_rows, v_rows = _write_rows(pool, PageAllocator(90), [13, 0, 1, 22], 8, gen)
    k, v, _ = pool.gather_padded(layer)
    for h, n in enumerate([13, 0, 1, 22]):
        c = -(-n // page_size)
        assert torch.equal(k[h, :n], k_rows[h]) and torch.equal(v[h, :n], v_rows[h])
        assert not k[h, n:c * page_size].any() and not v[h, n:c * page_size].any(), f"row {h}: padding not zero"
    untouched = sorted(set(range(90)) - set(layer.kv_indices.tolist()))
    assert (pool.k_pages[untouched] == 7.0).all() and (pool.v_pages[untouched] == -7.0).all()


def test_write_converts_to_the_pool_dtype():
    gen = torch.Generator().manual_seed(3)
    pool = RaggedHeadKVPool(40, 3, 8, torch.bfloat16, "cpu")
    layer, k_rows, v_rows = _write_rows(pool, PageAllocator(40), [5, 0, 11], 8, gen)
    k, v, mask = pool.gather_padded(layer)
    assert k.dtype == torch.bfloat16
    for h, n in enumerate([5, 0, 11]):
        assert torch.equal(k[h, :n], k_rows[h].to(torch.bfloat16))
        assert torch.equal(v[h, :n], v_rows[h].to(torch.bfloat16))
    assert pool.bytes_per_page == 2 * 3 * 8 * 2


def test_gather_padded_of_only_empty_rows():
    pool = RaggedHeadKVPool(4, 3, 8, torch.float32, "cpu")
    layer = LayerPages(kv_indptr=torch.zeros(4, dtype=torch.int64), kv_indices=torch.zeros(0, dtype=torch.int64),
                       lengths=torch.zeros(3, dtype=torch.int64), _page_size=3)
    k, v, mask = pool.gather_padded(layer)
    assert k.shape == (3, 3, 8) and mask.shape == (3, 3)
    assert not mask.any()
    assert layer.kv_last_page_len.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "page_size, lengths, expected",
    [
        (1, [0, 1, 2, 97], [0, 1, 1, 1]),
        (3, [0, 1, 2, 3, 4, 7, 54, 97], [0, 1, 2, 3, 1, 1, 3, 1]),
        (16, [0, 1, 15, 16, 17, 54, 301], [0, 1, 15, 16, 1, 6, 13]),
    ],
)
def test_kv_last_page_len(page_size, lengths, expected):
    lens = torch.tensor(lengths, dtype=torch.int64)
    layer = LayerPages(kv_indptr=torch.zeros(len(lengths) + 1, dtype=torch.int64),
                       kv_indices=torch.zeros(0, dtype=torch.int64), lengths=lens, _page_size=page_size)
    assert layer.kv_last_page_len.tolist() == expected
    pool = RaggedHeadKVPool(1, page_size, 8, torch.float32, "cpu")
    pages = pool.pages_for(lens)
    # (pages - 1) * page_size + last_page_len == length on every non-empty row
    nz = lens > 0
    assert torch.equal((pages[nz] - 1) * page_size + layer.kv_last_page_len[nz], lens[nz])
    assert pages.tolist() == [-(-n // page_size) for n in lengths]


def test_request_pages_held_bytes():
    pool = RaggedHeadKVPool(2, 16, 64, torch.float16, "cpu")
    assert pool.bytes_per_page == 2 * 16 * 64 * 2
    rec = RequestPages(prompt_len=10, policy="snapkv", budget=4, page_ids=[3, 5, 8])
    assert rec.held_bytes(pool.bytes_per_page) == 3 * pool.bytes_per_page
