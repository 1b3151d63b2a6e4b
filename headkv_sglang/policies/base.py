"""The KV-compression policy interface and the pieces every policy shares.

A policy decides, at the end of a request's prefill and for every
(layer, KV head), which prompt tokens stay in the cache. The serving backend
calls, layer by layer::

    planned = policy.plan_budgets(T, B, L, H)          # once per request
    scores  = policy.token_scores(q_win, k, layer)      # [H, T]
    budgets = policy.layer_budgets(layer, T, B, scores, planned)
    kept    = policy.select(scores, budgets)            # per head, sorted

or simply :func:`compress_layer`, which does all three and gathers the kept
keys and values into a ragged (CSR) layout.

Budget semantics
----------------
``budget`` ``B`` is the number of prompt tokens kept per **KV head**, on
average over all ``L * H_kv`` heads of the model, **including** the
observation window (the last ``window_size`` prompt tokens, always kept) and
attention sinks. Budgets are GQA-native: a KV head's token scores aggregate the
query heads of its group, and one budget unit is one (key, value) pair of one
KV head. (HeadKV's published budgets count query heads after ``repeat_kv``;
with 4 query heads per KV head those are 4x the memory of ours.)

* Score-based planners (:class:`~headkv_sglang.policies.SnapKV`, PyramidKV,
  HeadKV, AdaKV, StreamingLLM) never keep more than ``L * H * B`` tokens in
  total. No head keeps more than ``T`` (the prompt length); the budget a
  clamped head cannot use is redistributed to the heads still below ``T``, so
  the total is ``min(L * H * B, L * H * T)``.
* :class:`~headkv_sglang.policies.RazorAttention` keeps every token on its
  retrieval heads, so its total is **not** bounded by ``L * H * B``; its
  compensation token (one merged state per compressed head) is not counted
  in ``B`` either.
* :class:`~headkv_sglang.policies.FullKV` keeps all ``T`` tokens.
* When ``B`` is smaller than the window, a head keeps only its last ``B``
  tokens.

Shared selection
----------------
For a head with budget ``b`` and prompt length ``T``: ``b >= T`` keeps
everything; otherwise the last ``min(w, b)`` tokens (the window) plus the
``b - min(w, b)`` highest-scored positions of ``[0, T - w)``, ties broken
towards the lower position so that selection is deterministic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

PoolingKind = Literal["avgpool", "maxpool"]
GqaAggregation = Literal["mean", "max"]

POOLINGS: tuple[str, ...] = ("avgpool", "maxpool")
GQA_AGGREGATIONS: tuple[str, ...] = ("mean", "max")


# --------------------------------------------------------------------------- #
# Validation helpers (used by the policies' __post_init__)
# --------------------------------------------------------------------------- #
def check_int(cls_name: str, field: str, value: object, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{cls_name}.{field} must be an int >= {minimum}, got {value!r}"
        )


def check_float(
    cls_name: str,
    field: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ValueError unless ``value`` is a real number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) or v == high == math.inf
        ok = ok and (v >= low if low_inclusive else v > low)
        ok = ok and (v <= high if high_inclusive else v < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(
            f"{cls_name}.{field} must be a number in {lo}{low}, {high}{hi}, got {value!r}"
        )


def check_choice(cls_name: str, field: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{cls_name}.{field} must be one of {list(allowed)}, got {value!r}")


def check_head_table(
    cls_name: str, field: str, value: object, *, dtype_kind: Literal["float", "bool"]
) -> torch.Tensor:
    """Validate a per-(layer, KV head) table and return a private CPU copy.

    The copy keeps a frozen policy immune to the caller mutating its tensor.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{cls_name}.{field} must be a torch.Tensor of shape [num_layers, num_kv_heads], "
            f"got {type(value).__name__}"
        )
    if value.dim() != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise ValueError(
            f"{cls_name}.{field} must have shape [num_layers, num_kv_heads], "
            f"got {list(value.shape)}"
        )
    if dtype_kind == "bool":
        if value.dtype != torch.bool:
            raise ValueError(f"{cls_name}.{field} must be a bool tensor, got {value.dtype}")
        return value.detach().to("cpu").clone()
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{cls_name}.{field} must be a real tensor, got {value.dtype}")
    t = value.detach().to("cpu", torch.float64).clone()
    if not torch.isfinite(t).all() or (t < 0).any() or t.sum() <= 0:
        raise ValueError(
            f"{cls_name}.{field} must be finite, >= 0 and not all zero; "
            f"got min={t.min().item()}, max={t.max().item()}, sum={t.sum().item()}"
        )
    return t


def check_model_shape(
    cls_name: str, field: str, table: torch.Tensor, num_layers: int, num_kv_heads: int
) -> None:
    """A head profile must have been measured on a model of the same shape."""
    if tuple(table.shape) != (num_layers, num_kv_heads):
        raise ValueError(
            f"{cls_name}.{field} has shape {list(table.shape)} but the model has "
            f"[num_layers={num_layers}, num_kv_heads={num_kv_heads}]; use a profile "
            f"measured on this model (per KV head, query heads of a group aggregated)"
        )


def check_request(seq_len: int, budget: int, num_layers: int = 1, num_kv_heads: int = 1) -> None:
    """Validate the per-request arguments of the planners."""
    for name, value in (
        ("seq_len", seq_len),
        ("budget", budget),
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# --------------------------------------------------------------------------- #
# Budget helpers
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #
def check_scoring_inputs(q_win: torch.Tensor, k: torch.Tensor, window_size: int) -> int:
    """Validate ``q_win`` / ``k`` and return the GQA group size."""
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
    if w != min(window_size, seq_len):
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
) -> torch.Tensor:
    """SnapKV token scores (arXiv 2404.14469), aggregated per KV head.

    Parameters
    ----------
    q_win : torch.Tensor
        ``[num_q_heads, w, head_dim]`` (any float dtype): the last
        ``w = min(window_size, T)`` prompt queries, after RoPE.
    k : torch.Tensor
        ``[num_kv_heads, T, head_dim]``, same dtype family: the prompt keys.
    window_size, kernel_size, pooling, gqa_agg
        See :class:`ObservationWindowPolicy`.

    Returns
    -------
    torch.Tensor
        float32 ``[num_kv_heads, T]``: for positions ``< T - w`` the attention
        mass the window queries put on the key (causal inside the window,
        softmax over all keys in float32, summed over the window), smoothed by
        a stride-1 pooling of width ``kernel_size``, then averaged (or maxed)
        over the query heads of the KV head's group; ``+inf`` on the window.
    """
    group = check_scoring_inputs(q_win, k, window_size)
    num_kv_heads, seq_len, head_dim = k.shape
    w = q_win.shape[1]
    prefix = seq_len - w
    out = torch.full((num_kv_heads, seq_len), math.inf, dtype=torch.float32, device=k.device)
    if prefix == 0:
        return out
    q = q_win.to(torch.float32).reshape(num_kv_heads, group, w, head_dim)
    logits = torch.einsum("hgwd,htd->hgwt", q, k.to(torch.float32)) / math.sqrt(head_dim)
    # Window query i sits at absolute position prefix + i and sees keys <= it.
    key_pos = torch.arange(seq_len, device=k.device)
    query_pos = prefix + torch.arange(w, device=k.device)
    future = key_pos[None, :] > query_pos[:, None]
    logits = logits.masked_fill(future, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    mass = probs.sum(dim=2)[..., :prefix]  # [H, G, prefix]
    flat = mass.reshape(num_kv_heads * group, 1, prefix)
    pad = kernel_size // 2
    if pooling == "avgpool":
        pooled = F.avg_pool1d(flat, kernel_size=kernel_size, stride=1, padding=pad)
    else:
        pooled = F.max_pool1d(flat, kernel_size=kernel_size, stride=1, padding=pad)
    pooled = pooled.reshape(num_kv_heads, group, prefix)
    agg = pooled.mean(dim=1) if gqa_agg == "mean" else pooled.amax(dim=1)
    out[:, :prefix] = agg
    return out


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


# --------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------- #
def select_tokens(scores: torch.Tensor, budgets: torch.Tensor, window_size: int) -> list[torch.Tensor]:
    """The shared per-head selection step.

    Parameters
    ----------
    scores : torch.Tensor
        float ``[num_kv_heads, T]``; only positions ``< T - min(window_size, T)``
        are compared.
    budgets : torch.Tensor
        int64 ``[num_kv_heads]``; clamped to ``[0, T]``.
    window_size : int
        Observation window ``w``: the last ``min(w, b)`` tokens are always kept.

    Returns
    -------
    list[torch.Tensor]
        Per KV head, sorted int64 indices (on ``scores.device``) of the kept
        tokens, ``len == clamp(budgets[h], 0, T)``: the window plus the top
        ``b - min(w, b)`` prefix positions by score, ties to the lower index.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_kv_heads, T], got {list(scores.shape)}")
    num_heads, seq_len = scores.shape
    if budgets.shape != (num_heads,):
        raise ValueError(f"budgets must be [{num_heads}], got {list(budgets.shape)}")
    device = scores.device
    w = min(window_size, seq_len)
    prefix = seq_len - w
    # A stable descending sort puts equal scores in index order: deterministic ties.
    order = torch.sort(scores[:, :prefix], dim=1, descending=True, stable=True).indices
    kept: list[torch.Tensor] = []
    for h, b in enumerate(budgets.clamp(0, seq_len).tolist()):
        if b >= seq_len:
            kept.append(torch.arange(seq_len, dtype=torch.int64, device=device))
            continue
        n_win = min(w, b)
        window = torch.arange(seq_len - n_win, seq_len, dtype=torch.int64, device=device)
        top = order[h, : b - n_win]
        kept.append(torch.cat([torch.sort(top).values, window]))
    return kept


# --------------------------------------------------------------------------- #
# The interface
# --------------------------------------------------------------------------- #
class KVPolicy(ABC):
    """Which prompt tokens each (layer, KV head) keeps after prefill.

    Subclasses are small frozen dataclasses named after their paper whose
    fields are the paper's hyperparameters. See the module docstring for the
    budget semantics.
    """

    name: ClassVar[str]
    #: True only for RazorAttention: the dropped tokens of a head are merged
    #: into one extra (key, value) state whose logit gets ``+log(count)``.
    uses_compensation: ClassVar[bool] = False
    #: False when the scores ignore the queries (position-based policies): the
    #: backend may then skip capturing ``q_win`` and pass an empty tensor.
    needs_queries: ClassVar[bool] = True

    window_size: int

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ValueError if this policy cannot serve a model of this shape.

        Call it at server start: policies carrying a per-head profile check
        that it was measured on a model with the same layers and KV heads.
        """
        check_request(1, 1, num_layers, num_kv_heads)

    @abstractmethod
    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor | None:
        """Per-head budgets known before scoring.

        Returns
        -------
        torch.Tensor | None
            int64 ``[num_layers, num_kv_heads]`` on the CPU, each in
            ``[0, seq_len]``; ``None`` when budgets depend on the scores
            (AdaKV), in which case :meth:`layer_budgets` computes them.
        """

    @abstractmethod
    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor:
        """Importance of every prompt token for every KV head of ``layer``.

        Parameters
        ----------
        q_win : torch.Tensor
            ``[num_q_heads, w, head_dim]``, the last ``w = min(window_size, T)``
            prompt queries after RoPE (may be empty when ``needs_queries`` is
            False).
        k : torch.Tensor
            ``[num_kv_heads, T, head_dim]``, the prompt keys after RoPE.
        layer : int
            Layer index.

        Returns
        -------
        torch.Tensor
            float32 ``[num_kv_heads, T]`` on ``k.device``; ``+inf`` on the
            observation window.
        """

    def layer_budgets(
        self,
        layer: int,
        seq_len: int,
        budget: int,
        scores: torch.Tensor,
        planned: torch.Tensor | None,
    ) -> torch.Tensor:
        """int64 ``[num_kv_heads]`` budgets of ``layer`` (default: ``planned[layer]``).

        ``scores`` is float32 ``[num_kv_heads, T]`` from :meth:`token_scores`.
        """
        assert planned is not None, (
            f"{type(self).__name__} plans its budgets up front; pass plan_budgets()'s result"
        )
        assert 0 <= layer < planned.shape[0], f"layer {layer} outside planned {list(planned.shape)}"
        return planned[layer]

    def select(self, scores: torch.Tensor, budgets: torch.Tensor) -> list[torch.Tensor]:
        """Per KV head, sorted int64 indices of the kept prompt tokens.

        ``scores``: float32 ``[num_kv_heads, T]``; ``budgets``: int64
        ``[num_kv_heads]``. ``len(result[h]) == min(budgets[h], T)``.
        """
        return select_tokens(scores, budgets.to("cpu"), self.window_size)


# --------------------------------------------------------------------------- #
# Compression of one layer
# --------------------------------------------------------------------------- #
@dataclass
class CompressedLayer:
    """The kept prompt KV of one layer, one CSR row per KV head.

    Attributes
    ----------
    k_flat, v_flat : torch.Tensor
        ``[N, head_dim]`` (dtype of the input K/V): rows
        ``indptr[h]:indptr[h+1]`` hold head ``h``'s kept tokens, in position
        order.
    indptr : torch.Tensor
        int64 ``[num_kv_heads + 1]``, ``indptr[0] == 0``, ``indptr[-1] == N``.
    indices : torch.Tensor
        int64 ``[N]``: the prompt positions of the kept tokens.
    comp_k, comp_v : torch.Tensor | None
        ``[num_kv_heads, head_dim]`` (input dtype): mean key / value of each
        head's dropped tokens (zeros where nothing was dropped); None unless
        the policy uses compensation.
    comp_count : torch.Tensor | None
        int64 ``[num_kv_heads]``: number of dropped tokens (0: no comp state).
    """

    k_flat: torch.Tensor
    v_flat: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    comp_k: torch.Tensor | None = None
    comp_v: torch.Tensor | None = None
    comp_count: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.indptr.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[num_kv_heads]`` kept tokens per head."""
        return self.indptr[1:] - self.indptr[:-1]


def compress_layer(
    policy: KVPolicy,
    layer: int,
    q_win: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int,
    planned: torch.Tensor | None,
) -> CompressedLayer:
    """Score, budget, select and gather one layer's prompt KV.

    Parameters
    ----------
    policy : KVPolicy
    layer : int
    q_win : torch.Tensor
        ``[num_q_heads, w, head_dim]``: the last ``min(window_size, T)`` prompt
        queries (post-RoPE).
    k, v : torch.Tensor
        ``[num_kv_heads, T, head_dim]``: the layer's prompt keys / values.
    budget : int
        ``B``, see the module docstring.
    planned : torch.Tensor | None
        ``policy.plan_budgets(T, B, L, H)`` (int64 ``[L, H]``) or None.

    Returns
    -------
    CompressedLayer
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"k and v must both be [num_kv_heads, T, head_dim], got {list(k.shape)} and {list(v.shape)}"
        )
    num_heads, seq_len, _ = k.shape
    scores = policy.token_scores(q_win, k, layer)
    budgets = policy.layer_budgets(layer, seq_len, budget, scores, planned)
    kept = policy.select(scores, budgets)
    assert len(kept) == num_heads, f"select returned {len(kept)} heads, expected {num_heads}"
    lengths = torch.tensor([t.numel() for t in kept], dtype=torch.int64)
    indptr = torch.zeros(num_heads + 1, dtype=torch.int64)
    torch.cumsum(lengths, dim=0, out=indptr[1:])
    indptr = indptr.to(k.device)
    indices = torch.cat(kept).to(k.device) if kept else torch.zeros(0, dtype=torch.int64)
    head_of = torch.repeat_interleave(torch.arange(num_heads, device=k.device), lengths.to(k.device))
    out = CompressedLayer(
        k_flat=k[head_of, indices], v_flat=v[head_of, indices], indptr=indptr, indices=indices
    )
    if policy.uses_compensation:
        keep_mask = torch.zeros(num_heads, seq_len, dtype=torch.bool, device=k.device)
        keep_mask[head_of, indices] = True
        dropped = (~keep_mask).to(torch.float32)
        count = dropped.sum(dim=1)
        denom = count.clamp(min=1.0)[:, None]
        out.comp_k = (torch.einsum("ht,htd->hd", dropped, k.to(torch.float32)) / denom).to(k.dtype)
        out.comp_v = (torch.einsum("ht,htd->hd", dropped, v.to(torch.float32)) / denom).to(v.dtype)
        out.comp_count = count.to(torch.int64)
    return out


# --------------------------------------------------------------------------- #
# Shared base of the observation-window (SnapKV-scored) policies
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, kw_only=True)
class ObservationWindowPolicy(KVPolicy):
    """Base of the policies that rank tokens with SnapKV's observation window.

    Parameters
    ----------
    window_size : int
        Observation window ``w``: the last ``w`` prompt tokens score the
        others and are always kept. PyramidKV's LongBench scripts use 8 (and
        so did this project's best SmolLM2 measurements); SnapKV/AdaKV's code
        default is 32.
    kernel_size : int
        Odd width of the stride-1 pooling that smooths the scores (7 in
        SnapKV, PyramidKV, AdaKV and HeadKV).
    pooling : {"maxpool", "avgpool"}
        Pooling kind ("maxpool" in all four projects' scripts).
    gqa_agg : {"mean", "max"}
        How the query heads of a KV head's group are combined.
    """

    window_size: int = 8
    kernel_size: int = 7
    pooling: PoolingKind = "maxpool"
    gqa_agg: GqaAggregation = "mean"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        check_int(cls, "window_size", self.window_size, 1)
        check_int(cls, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"{cls}.kernel_size must be odd (the pooling is centred), got {self.kernel_size}"
            )
        check_choice(cls, "pooling", self.pooling, POOLINGS)
        check_choice(cls, "gqa_agg", self.gqa_agg, GQA_AGGREGATIONS)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor:
        return observation_window_scores(
            q_win, k, self.window_size, self.kernel_size, self.pooling, self.gqa_agg
        )
