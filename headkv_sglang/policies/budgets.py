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
    """Pages of ``total`` tokens spread over ``rows`` rows in any way: each row wastes < one page."""
    return math.ceil(total / page_size) + rows


def average_bound_pages(seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int) -> int:
    """The ``max_pages`` of a policy that keeps at most ``min(B, T)`` tokens per row on average
    (HeadKV, Ada-KV, PyramidKV, D2O: rows of any length, the total fixed)."""
    rows = num_layers * num_kv_heads
    return total_bound_pages(rows * min(budget, seq_len), rows, page_size)
