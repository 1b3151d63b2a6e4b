"""Token scores and the shared per-head selection.

Two ways to score a prompt token for a KV head: the attention the observation window
puts on it (SnapKV and the policies built on it) or its position alone (sinks + recent
tokens: StreamingLLM, RazorAttention). Either way :func:`select_mask` keeps, per head,
the window plus the top-scored prefix positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_scoring_inputs(q_win: torch.Tensor, k: torch.Tensor, window_size: int,
                         q_end: int | None = None, pool_shift: int = 0) -> int:
    """Validate ``q_win`` / ``k`` (and ``q_end``, ``pool_shift``) and return the GQA group size."""
    if pool_shift < 0:
        raise ValueError(f"pool_shift must be >= 0, got {pool_shift}")
    if q_win.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q_win must be [num_q_heads, w, head_dim] and k [num_kv_heads, T, head_dim]; "
            f"got q_win {list(q_win.shape)}, k {list(k.shape)}"
        )
    num_q_heads, w, d = q_win.shape
    num_kv_heads, seq_len, dk = k.shape
    if d != dk:
        raise ValueError(f"head_dim differs: q_win has {d}, k has {dk}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if q_end is not None:
        if isinstance(q_end, bool) or not isinstance(q_end, int) or not 1 <= w <= q_end <= seq_len:
            raise ValueError(
                f"q_win holds {w} queries ending at position q_end={q_end!r}; expected "
                f"1 <= {w} <= q_end <= T={seq_len}"
            )
    elif w != min(window_size, seq_len):
        raise ValueError(
            f"q_win holds {w} queries; expected the last min(window_size={window_size}, "
            f"T={seq_len}) = {min(window_size, seq_len)} prompt queries"
        )
    return num_q_heads // num_kv_heads


def observation_window_scores(
    q_win: torch.Tensor,
    k: torch.Tensor,
    window_size: int,
    kernel_size: int,
    pooling: str,
    gqa_agg: str,
    q_end: int | None = None,
    pool_shift: int = 0,
) -> torch.Tensor:
    """SnapKV token scores (arXiv 2404.14469), aggregated per KV head.

    Parameters
    ----------
    q_win : torch.Tensor
        ``[num_q_heads, n, head_dim]`` (any float dtype), after RoPE: the prompt
        queries that score the tokens. Without ``q_end`` they are SnapKV's window,
        the last ``n = min(window_size, T)`` prompt queries.
    k : torch.Tensor
        ``[num_kv_heads, T, head_dim]``, same dtype family: the prompt keys.
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    q_end : int | None
        Question-aware scoring: the queries sit at positions ``[q_end - n, q_end)``
        (the request's question, which may end before the chat template's tail);
        the last ``w = min(window_size, T)`` tokens are still the kept window.
        None: ``q_end = T`` and ``n = w`` (SnapKV).
    pool_shift : int
        ``>= 0``: the pooling window of position ``p`` covers ``[p - r - s, p + r - s]``
        with ``r = kernel_size // 2`` and ``s = min(pool_shift, r)`` (at most a window
        ending at ``p``), so a token also inherits the attention of the ``r + s`` tokens
        before it and the span kept around an attended phrase reaches further right (the
        value after a key: a needle's number after its key words). 0: centred (SnapKV).

    Returns
    -------
    torch.Tensor
        float32 ``[num_kv_heads, T]``: for positions ``< T - w`` the attention
        mass the scoring queries put on the key (causal: a query at position p
        sees keys <= p; softmax over them in float32, summed over the queries),
        smoothed by a stride-1 pooling of width ``kernel_size`` (zero outside the
        prefix; avgpool divides by ``kernel_size``), then averaged (or
        maxed) over the query heads of the KV head's group; ``+inf`` on the window.
    """
    group = check_scoring_inputs(q_win, k, window_size, q_end, pool_shift)
    num_kv_heads, seq_len, head_dim = k.shape
    n = q_win.shape[1]
    q_end = seq_len if q_end is None else q_end
    prefix = seq_len - min(window_size, seq_len)
    out = torch.full((num_kv_heads, seq_len), math.inf, dtype=torch.float32, device=k.device)
    if prefix == 0:
        return out
    q = q_win.to(torch.float32).reshape(num_kv_heads, group, n, head_dim)
    k = k[:, :q_end]  # no scoring query sees a key after q_end
    logits = torch.einsum("hgwd,htd->hgwt", q, k.to(torch.float32)) / math.sqrt(head_dim)
    # Scoring query i sits at absolute position q_end - n + i and sees keys <= it.
    key_pos = torch.arange(q_end, device=k.device)
    query_pos = q_end - n + torch.arange(n, device=k.device)
    future = key_pos[None, :] > query_pos[:, None]
    logits = logits.masked_fill(future, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    mass = probs.sum(dim=2)[..., :prefix]  # [H, G, min(prefix, q_end)]
    if mass.shape[-1] < prefix:  # keys between the question and the window: no query sees them
        mass = F.pad(mass, (0, prefix - mass.shape[-1]))
    agg = pool_mass(mass, kernel_size, pooling, gqa_agg, pool_shift)
    out[:, :prefix] = agg
    return out


def pool_mass(mass: torch.Tensor, kernel_size: int, pooling: str, gqa_agg: str,
              pool_shift: int = 0) -> torch.Tensor:
    """SnapKV's smoothing and GQA aggregation of per-query-head attention masses.

    ``mass``: float ``[num_kv_heads, group, P]`` (>= 0), what the scoring queries put on
    each of ``P`` positions. Returns float32 ``[num_kv_heads, P]``: a stride-1 pooling of
    width ``kernel_size`` (zero outside; avgpool divides by ``kernel_size``; the window moved
    ``min(pool_shift, kernel_size // 2)`` to the past, see :func:`observation_window_scores`),
    then the mean (or max) over the group's query heads.
    """
    num_kv_heads, group, prefix = mass.shape
    r = kernel_size // 2
    pool_shift = min(pool_shift, r)
    # Zero padding (the mass is >= 0, so maxpool is unchanged by it; avgpool counts it, as
    # SnapKV's padded avg_pool1d does), more of it before the prefix when shifted.
    flat = F.pad(mass.to(torch.float32).reshape(num_kv_heads * group, 1, prefix), (r + pool_shift, r - pool_shift))
    if pooling == "avgpool":
        pooled = F.avg_pool1d(flat, kernel_size=kernel_size, stride=1)
    else:
        pooled = F.max_pool1d(flat, kernel_size=kernel_size, stride=1)
    pooled = pooled.reshape(num_kv_heads, group, prefix)
    return pooled.mean(dim=1) if gqa_agg == "mean" else pooled.amax(dim=1)


def max_attention(q: torch.Tensor, k: torch.Tensor, q_start: int, block: int = 256) -> torch.Tensor:
    """The most attention any of ``q``'s queries puts on each key: question-agnostic scores.

    Parameters
    ----------
    q : torch.Tensor
        ``[num_q_heads, n, head_dim]`` (post-RoPE): the queries of positions
        ``[q_start, q_start + n)``.
    k : torch.Tensor
        ``[num_kv_heads, T, head_dim]``: the keys from position 0 (keys from ``q_start + n``
        on are never seen, causal: they are clipped).
    q_start : int
        Position of the first query.
    block : int
        Queries per step (memory: ``num_q_heads x block x T`` floats).

    Returns
    -------
    torch.Tensor
        float32 ``[num_kv_heads, group, T']`` (``T' = min(T, q_start + n)``; ``group`` =
        query heads per KV head): for key ``t``, the largest causal softmax probability
        (float32, scaled by ``1/sqrt(head_dim)``, over keys ``<= `` the query's position) that a
        query of the group's head gives it; 0 for keys no query sees. Used to rank a document's
        tokens without its question: by its own queries (``self``) or by the queries of its
        repetition (``reconstruct``, KVzip).
    """
    H, group, t, blocks = _causal_blocks(q, k, q_start, block)
    out = torch.zeros(H, group, t, dtype=torch.float32, device=k.device)
    for probs in blocks:
        torch.maximum(out, probs.amax(dim=2), out=out)
    return out


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, q_start: int, block: int = 256) -> torch.Tensor:
    """H2O's accumulated attention: for each key, the sum over ``q``'s queries and over the
    query heads of each KV head's group of the causal softmax probability it gets (the
    ranking of H2O and D2O: ``kv_scoring accumulated``). Same inputs as :func:`max_attention`;
    returns float32 ``[num_kv_heads, 1, T']`` (the group summed: the masses' group axis is 1).
    Earlier keys are seen by more queries and gather more, as in H2O."""
    H, _, t, blocks = _causal_blocks(q, k, q_start, block)
    out = torch.zeros(H, 1, t, dtype=torch.float32, device=k.device)
    for probs in blocks:
        out += probs.sum(dim=(1, 2))[:, None]
    return out


def _causal_blocks(q: torch.Tensor, k: torch.Tensor, q_start: int, block: int):
    """Checks ``q`` and ``k`` (see :func:`max_attention`) -> ``(num_kv_heads, group, T',
    blocks)``: ``blocks`` yields the float32 causal softmax probabilities ``[num_kv_heads,
    group, b, T']`` of up to ``block`` queries at a time."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [num_q_heads, n, D] and k [num_kv_heads, T, D]; got {list(q.shape)}, "
                         f"{list(k.shape)}")
    num_q_heads, n, d = q.shape
    num_kv_heads = k.shape[0]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q_start < 0 or block < 1:
        raise ValueError(f"q_start must be >= 0 and block >= 1, got {q_start}, {block}")
    group = num_q_heads // num_kv_heads
    t = min(k.shape[1], q_start + n)
    kf = k[:, :t].to(torch.float32)
    qf = q.to(torch.float32).reshape(num_kv_heads, group, n, d) / math.sqrt(d)
    key_pos = torch.arange(t, device=k.device)

    def blocks():
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            logits = torch.einsum("hgnd,htd->hgnt", qf[:, :, lo:hi], kf)
            query_pos = q_start + torch.arange(lo, hi, device=k.device)
            logits = logits.masked_fill(key_pos[None, :] > query_pos[:, None], -math.inf)
            yield torch.softmax(logits, dim=-1)

    return num_kv_heads, group, t, blocks()


def sink_recency_scores(num_kv_heads: int, seq_len: int, window_size: int, sink_size: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Position-based scores for sink + recent-window policies.

    Returns float32 ``[num_kv_heads, seq_len]``: ``+inf`` on the observation
    window, then the first ``sink_size`` tokens above every other position,
    then more recent tokens above older ones, so the shared top-k selection
    keeps sinks + the most recent tokens.
    """
    pos = torch.arange(seq_len, dtype=torch.float32, device=device)
    scores = pos.clone()
    scores[: min(sink_size, seq_len)] = float(2 * seq_len)
    w = min(window_size, seq_len)
    if w > 0:
        scores[seq_len - w :] = math.inf
    return scores.expand(num_kv_heads, seq_len).contiguous()


def select_mask(scores: torch.Tensor, budgets: torch.Tensor, window_size: int) -> torch.Tensor:
    """The shared per-head selection step, batched over heads.

    Parameters
    ----------
    scores : torch.Tensor
        float ``[num_kv_heads, T]``; only positions ``< T - min(window_size, T)``
        are compared.
    budgets : torch.Tensor
        int64 ``[num_kv_heads]`` (any device); clamped to ``[0, T]``.
    window_size : int
        Observation window ``w``: the last ``min(w, b)`` tokens are always kept.

    Returns
    -------
    torch.Tensor
        bool ``[num_kv_heads, T]`` on ``scores.device``: head ``h`` keeps
        ``clamp(budgets[h], 0, T)`` tokens, the window plus the top ``b - min(w, b)``
        prefix positions by score, ties to the lower index. One sort and two scatters
        for all heads (no loop over heads); ``mask.nonzero()`` lists the kept tokens head
        by head in position order, the CSR form the pool stores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_kv_heads, T], got {list(scores.shape)}")
    num_heads, seq_len = scores.shape
    if budgets.shape != (num_heads,):
        raise ValueError(f"budgets must be [{num_heads}], got {list(budgets.shape)}")
    device = scores.device
    w = min(window_size, seq_len)
    prefix = seq_len - w
    b = budgets.to(device=device, dtype=torch.int64).clamp(0, seq_len)
    n_win = b.clamp(max=w)
    n_top = b - n_win  # <= prefix
    pos = torch.arange(seq_len, device=device)
    # the window: the last n_win[h] positions
    keep = pos[None, :] >= (seq_len - n_win)[:, None]
    if prefix > 0:
        # A stable descending sort puts equal scores in index order: deterministic ties.
        order = torch.sort(scores[:, :prefix], dim=1, descending=True, stable=True).indices
        ranked = torch.arange(prefix, device=device)[None, :] < n_top[:, None]  # rank j is kept
        keep[:, :prefix].scatter_(1, order, ranked)
    return keep


def select_tokens(scores: torch.Tensor, budgets: torch.Tensor, window_size: int) -> list[torch.Tensor]:
    """:func:`select_mask` as one sorted int64 index tensor per KV head (on ``scores.device``),
    ``len == clamp(budgets[h], 0, T)``."""
    keep = select_mask(scores, budgets, window_size)
    lengths = keep.sum(dim=1).tolist()
    return list(keep.nonzero()[:, 1].split(lengths))
