"""Decode-phase compression: which generated tokens each (layer, KV head) keeps.

A compressed request's generated tokens first live whole in SGLang's token pool (its
*tail*). With a decode budget ``B_d`` (``--kv-decode-budget`` / ``kv_decode_budget``),
once the tail is longer than the recent window ``W`` plus a chunk ``C``, the chunk's
oldest tokens move into the request's pages: together with the generated tokens already
kept there they are ranked, and every KV head keeps the best ``min(B_d, candidates)``.
The recent ``W`` tokens stay in the tail, whole. Memory per request then stays within
its prompt's pages + ``B_d`` generated tokens per head + a tail of ``W + C`` tokens,
however long it generates.

Ranking (H2O / SnapKV at decode time): the attention the last ``W`` decode queries pay
each candidate, summed over the queries and the query heads of the KV head's group. A
position-based policy (StreamingLLM) keeps the newest candidates instead. The same number
per KV head (``B_d``, like SnapKV's uniform budget), so the kept set is dense ``[H, n]``.

Pure torch; nothing here imports SGLang.
"""

from __future__ import annotations

import torch

#: Smallest chunk moved at once: compressing costs one read and write of the kept
#: generated tokens, so it should not run every step.
MIN_CHUNK = 16


def decode_chunk(decode_budget: int) -> int:
    """Tokens the tail must exceed its window by before they move into pages."""
    return max(MIN_CHUNK, decode_budget // 2)


def decode_scores(q: torch.Tensor, k: torch.Tensor, scale: float, recency: bool = False) -> torch.Tensor:
    """float32 ``[H, n]`` importance of ``n`` candidate keys per KV head.

    ``q``: ``[Hq, w, D]`` the recent decode queries (query head ``h * G + g`` belongs to KV
    head ``h``); ``k``: ``[H, n, D]`` the candidates, oldest first. ``recency``: rank by
    position (newest best) and ignore ``q``.
    """
    H, n, D = k.shape
    if recency:
        return torch.arange(n, dtype=torch.float32, device=k.device).expand(H, n).clone()
    Hq, w, _ = q.shape
    if Hq % H:
        raise ValueError(f"{Hq} query heads do not group onto {H} KV heads")
    qf = q.float().view(H, Hq // H, w, D)
    logits = torch.einsum("hgwd,hnd->hgwn", qf, k.float()) * scale
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))


def select_decode(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """int64 ``[H, keep]``: per head the ``keep`` best candidates, ascending (position order).

    Ties go to the older candidate (a stable sort), so the choice is deterministic."""
    H, n = scores.shape
    if not 0 <= keep <= n:
        raise ValueError(f"keep {keep} of {n} candidates")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values
