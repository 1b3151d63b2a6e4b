"""The pure-torch reference attention against naive dense computations (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from headkv_sglang.policies import FullKV, RazorAttention, SnapKV, get_policy
from headkv_sglang.reference import (
    attend,
    compress_prompt,
    dense_decode,
    flat_to_paged,
    merge_states,
    paged_to_flat,
    ragged_decode,
)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Per-query loops in float64."""
    outs, lses = [], []
    for qi in q.double():
        logits = [float(qi @ kj) * scale for kj in k.double()]
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        outs.append(sum(math.exp(x - m) / z * vj for x, vj in zip(logits, v.double())))
        lses.append(m + math.log(z))
    return torch.stack(outs).float(), torch.tensor(lses, dtype=torch.float32)


def random_prompt(num_layers, num_kv, group, seq_len, head_dim, window, seed):
    g = torch.Generator().manual_seed(seed)
    w = min(window, seq_len)
    qs = [torch.randn(num_kv * group, w, head_dim, generator=g) for _ in range(num_layers)]
    ks = [torch.randn(num_kv, seq_len, head_dim, generator=g) for _ in range(num_layers)]
    vs = [torch.randn(num_kv, seq_len, head_dim, generator=g) for _ in range(num_layers)]
    return qs, ks, vs


def stack_requests(layers_per_request, layer):
    """Concatenate several requests' CompressedLayer rows into one ragged batch."""
    ks, vs, lens, ck, cv, cc = [], [], [], [], [], []
    for req in layers_per_request:
        c = req[layer]
        ks.append(c.k_flat)
        vs.append(c.v_flat)
        lens.append(c.lengths)
        if c.comp_k is not None:
            ck.append(c.comp_k)
            cv.append(c.comp_v)
            cc.append(c.comp_count)
    lengths = torch.cat(lens)
    indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    comp = (torch.cat(ck), torch.cat(cv), torch.cat(cc)) if ck else (None, None, None)
    return torch.cat(ks), torch.cat(vs), indptr, comp


# --------------------------------------------------------------------------- #
# attend / merge_states
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n, head_dim", [(1, 7), (5, 64), (97, 7)])
def test_attend_matches_naive(n, head_dim):
    torch.manual_seed(n + head_dim)
    q, k, v = torch.randn(3, head_dim), torch.randn(n, head_dim), torch.randn(n, head_dim)
    o, lse = attend(q, k, v, 1 / math.sqrt(head_dim))
    want_o, want_lse = naive_attention(q, k, v, 1 / math.sqrt(head_dim))
    assert o.dtype == lse.dtype == torch.float32 and o.shape == (3, head_dim) and lse.shape == (3,)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_attend_bias_is_a_log_multiplicity():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 7), torch.randn(4, 7), torch.randn(4, 7)
    o, lse = attend(q, k, v, 0.5, bias=torch.tensor([0.0, math.log(3), 0.0, 0.0]))
    k_rep = torch.cat([k[:1], k[1:2].expand(3, 7), k[2:]])
    v_rep = torch.cat([v[:1], v[1:2].expand(3, 7), v[2:]])
    want_o, want_lse = naive_attention(q, k_rep, v_rep, 0.5)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_attend_empty_row():
    o, lse = attend(torch.randn(4, 7), torch.zeros(0, 7), torch.zeros(0, 7), 0.3)
    assert torch.equal(o, torch.zeros(4, 7)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("n, split", [(54, 20), (97, 1), (5, 4), (301, 150)])
def test_merge_of_splits_equals_attention_over_union(n, split):
    torch.manual_seed(n + split)
    q, k, v = torch.randn(4, 64), torch.randn(n, 64) * 2, torch.randn(n, 64)
    perm = torch.randperm(n)
    a, b = perm[:split], perm[split:]
    o1, l1 = attend(q, k[a], v[a], 0.125)
    o2, l2 = attend(q, k[b], v[b], 0.125)
    o, lse = merge_states(o1, l1, o2, l2)
    want_o, want_lse = attend(q, k, v, 0.125)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_sides():
    torch.manual_seed(0)
    o1, l1 = attend(torch.randn(3, 7), torch.randn(6, 7), torch.randn(6, 7), 0.4)
    empty_o, empty_l = torch.zeros(3, 7), torch.full((3,), -math.inf)
    for o, lse in (merge_states(o1, l1, empty_o, empty_l), merge_states(empty_o, empty_l, o1, l1)):
        torch.testing.assert_close(o, o1)
        torch.testing.assert_close(lse, l1)
    o, lse = merge_states(empty_o, empty_l, empty_o, empty_l)
    assert torch.equal(o, empty_o) and torch.isneginf(lse).all()


# --------------------------------------------------------------------------- #
# ragged_decode vs dense_decode
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("seq_lens", [(1,), (54, 97), (5, 301, 17)])
@pytest.mark.parametrize("policy", [FullKV(), SnapKV(window_size=8)])
def test_uncompressed_ragged_equals_dense(group, seq_lens, policy):
    num_layers, num_kv, d = 2, 2, 64
    scale = 1 / math.sqrt(d)
    requests, prompts = [], []
    for i, t in enumerate(seq_lens):
        qs, ks, vs = random_prompt(num_layers, num_kv, group, t, d, policy.window_size, seed=100 * i + group)
        # budget >= T: nothing may be dropped, whatever the policy
        requests.append(compress_prompt(policy, qs, ks, vs, budget=max(seq_lens) + 3))
        prompts.append((ks, vs))
    torch.manual_seed(group)
    for layer in range(num_layers):
        k_flat, v_flat, indptr, _ = stack_requests(requests, layer)
        q = torch.randn(len(seq_lens), num_kv, group, d)
        o, lse = ragged_decode(q, k_flat, v_flat, indptr, scale)
        assert o.shape == (len(seq_lens), num_kv, group, d) and lse.shape == (len(seq_lens), num_kv, group)
        for r, (ks, vs) in enumerate(prompts):
            # SGLang's token-pool layout is [T, H_kv, D]
            want_o, want_lse = dense_decode(q[r].reshape(num_kv * group, d), ks[layer].transpose(0, 1),
                                            vs[layer].transpose(0, 1), scale)
            torch.testing.assert_close(o[r].reshape(-1, d), want_o, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[r].reshape(-1), want_lse, rtol=1e-5, atol=1e-5)


def test_dense_decode_matches_naive_repeat_kv():
    torch.manual_seed(11)
    q, k, v = torch.randn(6, 7), torch.randn(13, 2, 7), torch.randn(13, 2, 7)
    o, lse = dense_decode(q, k, v, 0.4)
    for j in range(6):
        want_o, want_lse = naive_attention(q[j : j + 1], k[:, j // 3], v[:, j // 3], 0.4)
        torch.testing.assert_close(o[j], want_o[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[j], want_lse[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "streamingllm"])
def test_compressed_ragged_equals_dense_over_kept_tokens(name):
    num_layers, num_kv, group, d, t, budget = 3, 2, 3, 7, 97, 23
    policy = get_policy(name, window_size=5)
    qs, ks, vs = random_prompt(num_layers, num_kv, group, t, d, 5, seed=5)
    layers = compress_prompt(policy, qs, ks, vs, budget)
    torch.manual_seed(6)
    for layer, c in enumerate(layers):
        q = torch.randn(1, num_kv, group, d)
        o, lse = ragged_decode(q, c.k_flat, c.v_flat, c.indptr, 0.3)
        for h in range(num_kv):
            idx = c.indices[c.indptr[h] : c.indptr[h + 1]]
            assert idx.numel() < t
            want_o, want_lse = naive_attention(q[0, h], ks[layer][h, idx], vs[layer][h, idx], 0.3)
            torch.testing.assert_close(o[0, h], want_o, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[0, h], want_lse, rtol=1e-5, atol=1e-5)


def test_ragged_decode_with_compensation_equals_repeated_comp_key():
    torch.manual_seed(21)
    num_kv, group, d, t, budget = 3, 2, 7, 54, 12
    mask = torch.tensor([[False, True, False]])
    policy = RazorAttention(retrieval_heads=mask, sink_size=4, window_size=4)
    qs, ks, vs = random_prompt(1, num_kv, group, t, d, 4, seed=9)
    layers = [compress_prompt(policy, qs, ks, vs, budget), compress_prompt(policy, qs, ks, vs, t)]
    k_flat, v_flat, indptr, (ck, cv, cc) = stack_requests(layers, 0)
    assert cc.tolist() == [t - budget, 0, t - budget, 0, 0, 0]
    q = torch.randn(2, num_kv, group, d)
    o, lse = ragged_decode(q, k_flat, v_flat, indptr, 0.35, ck, cv, cc)
    for row in range(2 * num_kv):
        r, h = divmod(row, num_kv)
        keys, vals = k_flat[indptr[row] : indptr[row + 1]], v_flat[indptr[row] : indptr[row + 1]]
        c = int(cc[row])
        keys = torch.cat([keys, ck[row].expand(c, d)])
        vals = torch.cat([vals, cv[row].expand(c, d)])
        want_o, want_lse = naive_attention(q[r, h], keys, vals, 0.35)
        torch.testing.assert_close(o[r, h], want_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[r, h], want_lse, rtol=1e-5, atol=1e-5)
    # the compensation state is not free: leaving it out changes the output
    o_plain, _ = ragged_decode(q, k_flat, v_flat, indptr, 0.35)
    assert (o_plain[0, 0] - o[0, 0]).abs().max() > 1e-3


def test_ragged_decode_empty_rows():
    torch.manual_seed(2)
    d = 7
    k_flat, v_flat = torch.randn(5, d), torch.randn(5, d)
    indptr = torch.tensor([0, 0, 5, 5])  # rows 0 and 2 empty
    q = torch.randn(3, 1, 2, d)
    o, lse = ragged_decode(q, k_flat, v_flat, indptr, 0.5)
    assert torch.equal(o[0], torch.zeros(1, 2, d)) and torch.isneginf(lse[0]).all()
    assert torch.equal(o[2], torch.zeros(1, 2, d)) and torch.isneginf(lse[2]).all()
    want_o, want_lse = naive_attention(q[1, 0], k_flat, v_flat, 0.5)
    torch.testing.assert_close(o[1, 0], want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[1, 0], want_lse, rtol=1e-5, atol=1e-5)
    # an empty row with a compensation state attends the comp token alone
    comp_k, comp_v = torch.randn(3, d), torch.randn(3, d)
    o, lse = ragged_decode(q, k_flat, v_flat, indptr, 0.5, comp_k, comp_v, torch.tensor([4, 0, 0]))
    torch.testing.assert_close(o[0, 0], comp_v[0].expand(2, d))
    torch.testing.assert_close(lse[0, 0], (q[0, 0] @ comp_k[0]) * 0.5 + math.log(4))
    assert torch.isneginf(lse[2]).all()


def test_ragged_decode_rejects_bad_layouts():
    q = torch.randn(2, 2, 1, 7)
    with pytest.raises(ValueError, match=r"indptr must be \[R \* H_kv \+ 1\] = \[5\]"):
        ragged_decode(q, torch.randn(3, 7), torch.randn(3, 7), torch.tensor([0, 1, 3]), 1.0)
    with pytest.raises(ValueError, match="together"):
        ragged_decode(q, torch.randn(3, 7), torch.randn(3, 7), torch.tensor([0, 1, 1, 2, 3]), 1.0,
                      comp_k=torch.randn(4, 7))


# --------------------------------------------------------------------------- #
# paged layout
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("lengths", [[54, 97, 1], [0, 5, 16, 17, 0], [301]])
def test_paged_round_trip(page_size, lengths):
    torch.manual_seed(page_size + len(lengths))
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(lengths), 0)
    flat = torch.randn(int(indptr[-1]), 7)
    gen = torch.Generator().manual_seed(1)
    pages, kv_indptr, kv_indices, last = flat_to_paged(flat, indptr, page_size, gen)
    assert pages.shape == (sum(-(-n // page_size) for n in lengths), page_size, 7)
    assert [int(x) for x in kv_indptr.diff()] == [-(-n // page_size) for n in lengths]
    assert all(1 <= int(last[r]) <= page_size for r, n in enumerate(lengths) if n)
    if len(kv_indices) > 1:
        assert not torch.equal(kv_indices, torch.arange(len(kv_indices))), "pages shuffled"
    got, got_indptr = paged_to_flat(pages, kv_indptr, kv_indices, last)
    assert torch.equal(got, flat) and torch.equal(got_indptr, indptr)


def test_paged_to_flat_hand_built():
    # page_size 2; row 0 = pages [2, 0] with 1 token in the last; row 1 = page [1], full
    pages = torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]], [[30.0], [31.0]]])
    kv_indptr, kv_indices = torch.tensor([0, 2, 3]), torch.tensor([2, 0, 1])
    flat, indptr = paged_to_flat(pages, kv_indptr, kv_indices, torch.tensor([1, 2]))
    assert flat.flatten().tolist() == [30.0, 31.0, 10.0, 20.0, 21.0]
    assert indptr.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match=r"kv_last_page_len\[0\] = 3 must be in \[1, page_size=2\]"):
        paged_to_flat(pages, torch.tensor([0, 2, 3]), torch.tensor([2, 0, 1]), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="kv_indices must lie in"):
        paged_to_flat(pages, torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([1]))
