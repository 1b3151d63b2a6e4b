"""Integer budget arithmetic shared by the planners, and page counts for admission."""

from __future__ import annotations

import math

import torch


def largest_remainder(ideal: torch.Tensor, total: int, caps: torch.Tensor) -> torch.Tensor:
    """Round real allocations to integers summing to exactly ``total``.

    Parameters
    ----------
    ideal : torch.Tensor
        float64 ``[n]``, ``0 <= ideal <= caps``, summing to ``total`` up to
        float error.
    total : int
        The integer sum the result must have.
    caps : torch.Tensor
        int64 ``[n]`` upper bounds.

    Returns
    -------
    torch.Tensor
        int64 ``[n]``: ``floor(ideal)`` plus one for the ``total - sum(floor)``
        entries with the largest fractional parts (ties: lower index first).
    """
    ideal = ideal.to(torch.float64)
    # An ideal of 5 computed as 4.999999999 must floor to 5, not lose a unit.
    base = torch.minimum(torch.floor(ideal + 1e-9).to(torch.int64), caps)
    base = torch.clamp(base, min=0)
    missing = int(total - base.sum().item())
    if missing == 0:
        return base
    frac = ideal - base.to(torch.float64)
    eligible = base < caps
    assert missing > 0, f"rounding overshoot: floors sum to {base.sum().item()} > total {total}"
    assert int(eligible.sum()) >= missing, (
        f"cannot place {missing} units: only {int(eligible.sum())} entries below cap; "
        f"ideal={ideal.tolist()} caps={caps.tolist()}"
    )
    frac = torch.where(eligible, frac, torch.full_like(frac, -math.inf))
    order = torch.sort(frac, descending=True, stable=True).indices[:missing]
    base[order] += 1
    return base


def waterfill(
    ideal: torch.Tensor, caps: torch.Tensor, weights: torch.Tensor, total: int
) -> torch.Tensor:
    """Cap real allocations and hand the excess to uncapped entries, by weight.

    Parameters
    ----------
    ideal : torch.Tensor
        float64 ``[n]`` non-negative allocations (e.g. one per head).
    caps : torch.Tensor
        int64 ``[n]`` upper bounds (e.g. the prompt length).
    weights : torch.Tensor
        float64 ``[n]`` non-negative shares for redistribution; entries whose
        weights are all zero share equally.
    total : int
        ``min(total, caps.sum())`` units are allocated.

    Returns
    -------
    torch.Tensor
        int64 ``[n]``, each ``<= caps``, summing to ``min(total, caps.sum())``.
        Repeats "clamp, then spread the overflow over the entries still below
        their cap in proportion to ``weights``" until nothing overflows; HeadKV's
        reference code clamps to ``T`` and silently drops the overflow.
    """
    alloc = ideal.to(torch.float64).clone()
    cap_f = caps.to(torch.float64)
    weights = weights.to(torch.float64)
    target = min(int(total), int(caps.sum().item()))
    for _ in range(alloc.numel() + 1):
        over = alloc > cap_f
        excess = float((alloc[over] - cap_f[over]).sum())
        alloc = torch.minimum(alloc, cap_f)
        if excess <= 1e-9:
            break
        free = alloc < cap_f
        if not free.any():
            break
        w = torch.where(free, weights, torch.zeros_like(weights))
        if float(w.sum()) <= 0.0:
            w = free.to(torch.float64)
        alloc = alloc + excess * w / w.sum()
    return largest_remainder(alloc, target, caps)


def effective_window(window_size: int, budget: int, seq_len: int) -> int:
    """Tokens of the observation window that are actually kept."""
    return min(window_size, budget, seq_len)


def uniform_pages(rows: int, row_len: int, page_size: int) -> int:
    """Pages of ``rows`` (layer, KV head) rows of ``row_len`` tokens each, rows padded to pages."""
    return rows * math.ceil(row_len / page_size)


def planned_pages(planned: torch.Tensor, page_size: int) -> int:
    """Pages of a plan: int64 ``[num_layers, num_kv_heads]`` kept tokens per row, rows padded."""
    return int(((planned + page_size - 1) // page_size).sum())


def total_bound_pages(total: int, rows: int, page_size: int) -> int:
    """Pages of ``total`` tokens spread over ``rows`` rows in any way: each row wastes at most
    ``page_size - 1`` slots of its last page (none with one-token pages)."""
    return (total + rows * (page_size - 1)) // page_size


def average_bound_pages(seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int) -> int:
    """The ``max_pages`` of a policy that keeps at most ``min(B, T)`` tokens per row on average
    (HeadKV, Ada-KV, PyramidKV, D2O: rows of any length, the total fixed)."""
    rows = num_layers * num_kv_heads
    return total_bound_pages(rows * min(budget, seq_len), rows, page_size)


def global_budgets(scores: torch.Tensor, total: int, window_size: int) -> torch.Tensor:
    """Tokens kept per (layer, KV head) when every row's scores compete for one budget (KVzip's
    selection): each row keeps its last ``min(window_size, T)`` tokens, and the rest of the
    ``total`` goes to the highest-scored positions before the windows, anywhere.

    ``scores``: float ``[num_layers, num_kv_heads, T]`` (comparable across rows: the most
    attention any scoring query gave each token). Returns int64 ``[num_layers, num_kv_heads]``
    (on ``scores.device``) summing to ``min(total, L * H * T)``. Ties go to the lower
    (layer, head, position), the order :func:`~headkv_sglang.policies.scoring.select_mask`
    breaks them in within a row, so selecting each row's budget from its own scores keeps
    exactly the global top. A ``total`` below the windows' ``L * H * w`` is spread evenly.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [num_layers, num_kv_heads, T], got {list(scores.shape)}")
    num_layers, num_heads, seq_len = scores.shape
    rows = num_layers * num_heads
    total = max(0, min(int(total), rows * seq_len))
    w = min(window_size, seq_len)
    extra = total - rows * w
    if extra <= 0:
        even = torch.full((rows,), total // rows, dtype=torch.int64, device=scores.device)
        even[:total % rows] += 1
        return even.view(num_layers, num_heads)
    prefix = seq_len - w  # > 0: extra > 0 means total > rows * w, and total <= rows * seq_len
    flat = scores[..., :prefix].reshape(-1)
    top = torch.sort(flat, descending=True, stable=True).indices[:extra]
    counts = torch.bincount(top // prefix, minlength=rows)
    return (counts + w).view(num_layers, num_heads)
