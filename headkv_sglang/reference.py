"""Pure-torch reference: compression and decode attention over the compressed cache.

The oracle every GPU kernel is tested against, and the CPU serving path.
Ragged layouts use FlashInfer's CSR terms: ``indptr`` (row offsets),
``indices`` (pages of each row), ``last_page_len``.

Log-sum-exp values here are natural logarithms. FlashInfer's kernels return
base-2 log-sum-exp (``lse_2``); compare ``lse_2 * ln(2)`` with ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from headkv_sglang.policies.base import CompressedLayer, KVPolicy, compress_layer


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of a few queries over one KV row, with its log-sum-exp.

    Parameters
    ----------
    q : torch.Tensor
        ``[G, D]`` queries (any float dtype).
    k, v : torch.Tensor
        ``[n, D]`` keys and values; ``n`` may be 0.
    scale : float
        Logit scale, usually ``1 / sqrt(D)``.
    bias : torch.Tensor | None
        float ``[n]`` added to every query's logits (e.g. ``log(count)``).

    Returns
    -------
    o : torch.Tensor
        float32 ``[G, D]``; zeros when ``n == 0`` (or every logit is ``-inf``).
    lse : torch.Tensor
        float32 ``[G]``, natural-log ``logsumexp`` of the logits; ``-inf``
        when ``n == 0``.
    """
    if q.dim() != 2 or k.dim() != 2 or v.shape != k.shape or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"expected q [G, D], k and v [n, D]; got q {list(q.shape)}, k {list(k.shape)}, "
            f"v {list(v.shape)}"
        )
    logits = (q.to(torch.float32) @ k.to(torch.float32).T) * scale
    if bias is not None:
        logits = logits + bias.to(torch.float32)[None, :]
    lse = torch.logsumexp(logits, dim=-1) if k.shape[0] else logits.new_full((q.shape[0],), -math.inf)
    finite = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse))[:, None])
    o = probs @ v.to(torch.float32)
    o = torch.where(finite[:, None], o, torch.zeros_like(o))
    return o, lse


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states over disjoint KV sets (FlashInfer's ``merge_state``).

    Parameters
    ----------
    o1, o2 : torch.Tensor
        ``[..., D]`` attention outputs (any float dtype).
    lse1, lse2 : torch.Tensor
        ``[...]`` natural-log log-sum-exp of each state's logits; ``-inf``
        marks an empty state.

    Returns
    -------
    o : torch.Tensor
        float32 ``[..., D]``, as if attention ran over the union.
    lse : torch.Tensor
        float32 ``[...]``.
    """
    lse1 = lse1.to(torch.float32)
    lse2 = lse2.to(torch.float32)
    lse = torch.logaddexp(lse1, lse2)
    # Both sides empty: exp(-inf - -inf) would be nan; shifting by 0 instead
    # makes an empty side weigh exp(-inf) = 0.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe)
    w2 = torch.exp(lse2 - safe)
    o = w1[..., None] * o1.to(torch.float32) + w2[..., None] * o2.to(torch.float32)
    return o, lse


def ragged_decode(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    indptr: torch.Tensor,
    scale: float,
    comp_k: torch.Tensor | None = None,
    comp_v: torch.Tensor | None = None,
    comp_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a per-(request, KV head) ragged cache.

    Parameters
    ----------
    q : torch.Tensor
        ``[R, H_kv, G, D]``: one decode query per request; the ``G`` query
        heads of KV head ``h`` are ``h * G .. h * G + G - 1``.
    k_flat, v_flat : torch.Tensor
        ``[N, D]``: row ``r * H_kv + h`` (request ``r``, KV head ``h``) holds
        ``k_flat[indptr[row]:indptr[row + 1]]``.
    indptr : torch.Tensor
        int64 ``[R * H_kv + 1]``.
    scale : float
        Logit scale.
    comp_k, comp_v : torch.Tensor | None
        ``[R * H_kv, D]`` compensation key / value per row (RazorAttention).
    comp_count : torch.Tensor | None
        int64 ``[R * H_kv]``: tokens the compensation state stands for; a row
        with ``c > 0`` attends one extra key whose logit gets ``+log(c)``.

    Returns
    -------
    o : torch.Tensor
        float32 ``[R, H_kv, G, D]``.
    lse : torch.Tensor
        float32 ``[R, H_kv, G]``, natural log; ``-inf`` for an empty row.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [R, H_kv, G, D], got {list(q.shape)}")
    num_req, num_heads, group, dim = q.shape
    rows = num_req * num_heads
    if indptr.shape != (rows + 1,):
        raise ValueError(f"indptr must be [R * H_kv + 1] = [{rows + 1}], got {list(indptr.shape)}")
    if k_flat.shape != v_flat.shape or k_flat.dim() != 2 or k_flat.shape[1] != dim:
        raise ValueError(
            f"k_flat and v_flat must be [N, {dim}], got {list(k_flat.shape)}, {list(v_flat.shape)}"
        )
    has_comp = comp_count is not None
    if has_comp != (comp_k is not None) or has_comp != (comp_v is not None):
        raise ValueError("pass comp_k, comp_v and comp_count together, or none of them")
    if has_comp:
        assert comp_k is not None and comp_v is not None and comp_count is not None
        for name, t, shape in (
            ("comp_k", comp_k, (rows, dim)),
            ("comp_v", comp_v, (rows, dim)),
            ("comp_count", comp_count, (rows,)),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    bounds = indptr.tolist()
    counts = comp_count.tolist() if has_comp else None  # type: ignore[union-attr]
    q_rows = q.reshape(rows, group, dim)
    o = torch.zeros(rows, group, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((rows, group), -math.inf, dtype=torch.float32, device=q.device)
    for row in range(rows):
        lo, hi = bounds[row], bounds[row + 1]
        o_r, lse_r = attend(q_rows[row], k_flat[lo:hi], v_flat[lo:hi], scale)
        if counts is not None and counts[row] > 0:
            bias = torch.full((1,), math.log(counts[row]), dtype=torch.float32, device=q.device)
            assert comp_k is not None and comp_v is not None
            o_c, lse_c = attend(q_rows[row], comp_k[row : row + 1], comp_v[row : row + 1], scale, bias)
            o_r, lse_r = merge_states(o_r, lse_r, o_c, lse_c)
        o[row], lse[row] = o_r, lse_r
    return o.reshape(num_req, num_heads, group, dim), lse.reshape(num_req, num_heads, group)


def dense_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive decode attention of one request over an uncompressed cache.

    Parameters
    ----------
    q : torch.Tensor
        ``[Hq, D]`` one decode query.
    k, v : torch.Tensor
        ``[T, H_kv, D]`` (SGLang's token-pool layout); ``Hq % H_kv == 0``.
    scale : float

    Returns
    -------
    o : torch.Tensor
        float32 ``[Hq, D]``.
    lse : torch.Tensor
        float32 ``[Hq]``, natural log.
    """
    num_q, dim = q.shape
    seq_len, num_kv, _ = k.shape
    if num_q % num_kv != 0:
        raise ValueError(f"num_q_heads ({num_q}) must be a multiple of num_kv_heads ({num_kv})")
    # repeat_kv: query head j reads KV head j // G.
    k_rep = k.to(torch.float32).repeat_interleave(num_q // num_kv, dim=1)  # [T, Hq, D]
    v_rep = v.to(torch.float32).repeat_interleave(num_q // num_kv, dim=1)
    logits = torch.einsum("hd,thd->ht", q.to(torch.float32), k_rep) * scale
    lse = torch.logsumexp(logits, dim=-1)
    o = torch.einsum("ht,thd->hd", torch.softmax(logits, dim=-1), v_rep)
    return o, lse


def compress_prompt(
    policy: KVPolicy,
    q_win_per_layer: Sequence[torch.Tensor],
    k_per_layer: Sequence[torch.Tensor],
    v_per_layer: Sequence[torch.Tensor],
    budget: int,
) -> list[CompressedLayer]:
    """Compress every layer of one prompt.

    Parameters
    ----------
    policy : KVPolicy
    q_win_per_layer : Sequence[torch.Tensor]
        Per layer ``[Hq, w, D]``, the last ``min(window_size, T)`` prompt queries.
    k_per_layer, v_per_layer : Sequence[torch.Tensor]
        Per layer ``[H_kv, T, D]``.
    budget : int
        ``B``, see :mod:`headkv_sglang.policies.base`.

    Returns
    -------
    list[CompressedLayer]
        One per layer.
    """
    num_layers = len(k_per_layer)
    if not (len(q_win_per_layer) == len(v_per_layer) == num_layers) or num_layers == 0:
        raise ValueError(
            f"need one q_win, k and v per layer; got {len(q_win_per_layer)}, "
            f"{num_layers}, {len(v_per_layer)}"
        )
    num_heads, seq_len, _ = k_per_layer[0].shape
    planned = policy.plan_budgets(seq_len, budget, num_layers, num_heads)
    return [
        compress_layer(policy, layer, q_win_per_layer[layer], k_per_layer[layer],
                       v_per_layer[layer], budget, planned)
        for layer in range(num_layers)
    ]


def paged_to_flat(
    pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a FlashInfer-style paged cache (one KV head per row) into CSR rows.

    Parameters
    ----------
    pages : torch.Tensor
        ``[P, page_size, D]`` page storage.
    kv_indptr : torch.Tensor
        int ``[rows + 1]``: row ``r`` owns ``kv_indices[kv_indptr[r]:kv_indptr[r+1]]``.
    kv_indices : torch.Tensor
        int ``[num_pages_used]``: page ids, in token order within each row.
    kv_last_page_len : torch.Tensor
        int ``[rows]``: tokens in each row's last page, ``1..page_size``
        (ignored for rows with no page).

    Returns
    -------
    flat : torch.Tensor
        ``[N, D]`` (dtype of ``pages``), rows concatenated.
    indptr : torch.Tensor
        int64 ``[rows + 1]`` token offsets of the rows in ``flat``.
    """
    if pages.dim() != 3:
        raise ValueError(f"pages must be [P, page_size, D], got {list(pages.shape)}")
    num_pages, page_size, _ = pages.shape
    rows = kv_last_page_len.numel()
    if kv_indptr.shape != (rows + 1,):
        raise ValueError(
            f"kv_indptr must be [rows + 1] = [{rows + 1}] for {rows} last_page_len entries, "
            f"got {list(kv_indptr.shape)}"
        )
    bounds = kv_indptr.tolist()
    last = kv_last_page_len.tolist()
    page_ids = kv_indices.to(torch.int64)
    if bounds[0] != 0 or bounds[-1] != page_ids.numel() or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"kv_indptr must rise from 0 to len(kv_indices)={page_ids.numel()}, got {bounds}"
        )
    if page_ids.numel() and (page_ids.min() < 0 or page_ids.max() >= num_pages):
        raise ValueError(f"kv_indices must lie in [0, {num_pages}), got {page_ids.tolist()}")
    pieces: list[torch.Tensor] = []
    lengths: list[int] = []
    for r in range(rows):
        ids = page_ids[bounds[r] : bounds[r + 1]]
        if ids.numel() == 0:
            lengths.append(0)
            continue
        if not 1 <= last[r] <= page_size:
            raise ValueError(
                f"kv_last_page_len[{r}] = {last[r]} must be in [1, page_size={page_size}]"
            )
        tokens = pages[ids].reshape(-1, pages.shape[-1])
        n = (ids.numel() - 1) * page_size + last[r]
        pieces.append(tokens[:n])
        lengths.append(n)
    flat = torch.cat(pieces) if pieces else pages.new_zeros((0, pages.shape[-1]))
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), dim=0, out=indptr[1:])
    return flat, indptr.to(pages.device)


def flat_to_paged(
    flat: torch.Tensor,
    indptr: torch.Tensor,
    page_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split CSR rows into pages: the inverse of :func:`paged_to_flat`.

    Parameters
    ----------
    flat : torch.Tensor
        ``[N, D]`` rows concatenated.
    indptr : torch.Tensor
        int64 ``[rows + 1]``.
    page_size : int
    generator : torch.Generator | None
        When given, pages are stored in a random order (so that tests exercise
        ``kv_indices``); otherwise in row order.

    Returns
    -------
    pages : torch.Tensor
        ``[P, page_size, D]``, unused slots zero.
    kv_indptr : torch.Tensor
        int64 ``[rows + 1]`` page offsets.
    kv_indices : torch.Tensor
        int64 ``[P]`` page ids.
    kv_last_page_len : torch.Tensor
        int64 ``[rows]``; 0 for an empty row.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    bounds = indptr.tolist()
    rows = len(bounds) - 1
    lengths = [bounds[r + 1] - bounds[r] for r in range(rows)]
    n_pages = [-(-n // page_size) for n in lengths]
    total = sum(n_pages)
    perm = (
        torch.randperm(total, generator=generator) if generator is not None else torch.arange(total)
    )
    pages = flat.new_zeros((total, page_size, flat.shape[-1]))
    kv_indptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(n_pages, dtype=torch.int64), dim=0, out=kv_indptr[1:])
    last = torch.zeros(rows, dtype=torch.int64)
    for r in range(rows):
        for p in range(n_pages[r]):
            lo = bounds[r] + p * page_size
            hi = min(lo + page_size, bounds[r + 1])
            pages[perm[kv_indptr[r] + p], : hi - lo] = flat[lo:hi]
        if lengths[r]:
            last[r] = lengths[r] - (n_pages[r] - 1) * page_size
    device = flat.device
    return pages, kv_indptr.to(device), perm.to(device, torch.int64), last.to(device)
