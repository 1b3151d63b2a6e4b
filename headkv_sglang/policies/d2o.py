"""D2O: layer budgets from attention density, dropped tokens merged into similar kept ones."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import average_bound_pages, effective_window, waterfill
from headkv_sglang.policies.checks import check_choice, check_model_shape, check_request
from headkv_sglang.policies.observation import SinkObservationPolicy
from headkv_sglang.policies.params import hyper

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape
    from headkv_sglang.policies.base import CompressedLayer

#: Most (token, kept token) similarities computed at once by :func:`merge_dropped`.
_SIM_CHUNK = 1 << 22
#: Weight of the previous threshold in decode-time merging's moving average (the
#: reference's ``alpha``; its ``belta``, the new mean's weight, is ``1 - alpha`` = 0.5).
DECODE_EMA = 0.5
#: How a kept token and the dropped tokens merged into it are averaged (:func:`merge_dropped`).
MERGE_WEIGHTINGS: tuple[str, ...] = ("similarity", "mean")


@dataclass(frozen=True, kw_only=True)
class D2O(SinkObservationPolicy):
    """D2O (Dynamic Discriminative Operations), its prompt-side half.

    https://arxiv.org/abs/2406.13035 (code: AIoT-MLSys-Lab/d2o,
    ``modeling_llama3_new.py`` and ``D2O_LayerKVCache`` in
    ``modeling_llama3_7b_13b_d2o.py``).

    **Layer level.** Layers whose attention is dense (low variance of the attention
    each key accumulates) lose more when tokens are evicted, so they keep more. With
    ``v_l`` a layer's attention variance, min-max normalised over the layers, a layer's
    prefix budget is ``L * (B - w) * softmax(-v)_l`` (the reference:
    ``ratio_l = L * rho * softmax(-v)_l``), capped at the prompt and the excess spread
    over the other layers (:func:`~headkv_sglang.policies.budgets.waterfill`), so the
    total is exactly ``L * H * min(B, T)``. All KV heads of a layer share its budget.

    **Token level.** Each head keeps its first ``sink_size`` tokens, the window and the
    tokens the scoring queries attend to most (SnapKV's scores). Every dropped token
    then finds its most similar kept token of the same head (cosine of the keys); when
    that similarity ``s`` reaches the threshold (the mean of those best similarities
    over the layer's dropped tokens), it is merged into it with the paper's weights, a
    softmax over the similarities in which the kept token's own similarity is 1: a kept
    token ``j`` with merged tokens ``i`` becomes
    ``(e k_j + sum_i e^{s_i} k_i) / (e + sum_i e^{s_i})``, and likewise ``v_j``, a convex
    combination (``merge="mean"``: the authors' code, ``scatter_reduce(mean, include_self)``
    of ``s * k``, i.e. ``(k_j + sum_i s_i k_i) / (1 + n_j)``, which shrinks ``k_j`` and
    ``v_j`` towards 0 when the ``s_i`` are below 1).

    Differences from the reference, each forced by serving or kept deliberately:

    * the layer variances come from a profile measured once on calibration text
      (``python -m headkv_sglang.profile --method d2o``: the variance over keys of the
      attention every key accumulates over the whole prompt, per query head) rather
      than from each request's own prefill, because the server compresses each layer
      right after its attention inside the forward, when later layers are not yet
      computed; the reference normalises each layer's per-head variances over its own
      heads, we normalise the layer means over the layers so that layers compare;
    * the kept tokens are scored by the request's scoring queries (SnapKV's window or
      the question), not by the attention accumulated over every prompt query (H2O),
      which costs ``T^2`` per layer; all layers are compressed (the reference leaves
      layers 0, 1 and the last whole) and the recent part is the observation window
      (the reference splits each layer's budget 1:1 between heavy and recent tokens);
    * the merge test is per (head, token) (the reference averages the similarity of
      the ``i``-th dropped token over heads, which are different tokens per head);
    * the prompt's threshold is the reference's first value; decode-phase compression
      (``kv_decode_budget``) merges the generated tokens it drops into the kept generated
      ones with the moving average over its later moves (:func:`merge_dropped`,
      ``prev_threshold``), restarted at the first move rather than continued from the
      prompt's, and the prompt's kept tokens are never merged into at decode (they are
      written once).

    Parameters
    ----------
    density : torch.Tensor
        float ``[num_layers, num_kv_heads]``, ``>= 0``: attention variance per head
        (the profile's ``kv_scores``); a layer's ``v_l`` is the mean of its row.
    sink_size : int
        First prompt tokens always kept: the setting ``d2o_sink_size`` (``--kv-d2o-sink-size``),
        not the ``sink_size`` of StreamingLLM, RazorAttention and PoD. 0 by default (the
        reference keeps 4; see ``defaults.D2O_SINK_SIZE`` for why).
    merge : {"on", "mean", "off"}
        Merge dropped tokens into similar kept ones with the paper's weights (``"on"``),
        the authors' code's mean (``"mean"``, prompt only: decode-time merging uses the
        paper's) or not (``"off"``: plain eviction).
    layers : {"profile", "uniform"}
        Layer budgets from the profile's attention variances (the paper's allocation) or
        the same for every layer.
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "d2o"
    profile_method: ClassVar[str | None] = "d2o"
    merges_dropped: ClassVar[bool] = True

    density: torch.Tensor = field(compare=False, repr=False)
    sink_size: int = hyper(defaults.D2O_SINK_SIZE, "D2O: attention-sink tokens kept (the first prompt tokens; "
                           "the D2O reference keeps 4, the default 0 keeps none: on the test model the sinks "
                           "took budget from the needle).", name="d2o_sink_size", low=0, high=4096)
    merge: str = hyper(defaults.D2O_MERGE, "D2O: merge each dropped token into its most similar kept token "
                       "with the paper's similarity weights ('on'), with the authors' code's count mean "
                       "('mean', prompt only), or drop it ('off', the default).",
                       name="d2o_merge", choices=defaults.D2O_MERGES)
    layers: str = hyper(defaults.D2O_LAYERS, "D2O: how layers share the budget: 'request' (each request's own "
                        "attention variances), 'profile' (the d2o profile's) or 'uniform' (the default).",
                        name="d2o_layers", choices=defaults.D2O_LAYER_CHOICES)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        table = torch.as_tensor(self.density)
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"{cls}.density must be a float [num_layers, num_kv_heads] tensor, "
                             f"got {table.dtype} {list(table.shape)}")
        table = table.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
            raise ValueError(f"{cls}.density must be finite and >= 0")
        object.__setattr__(self, "density", table)
        check_choice(cls, "merge", self.merge, defaults.D2O_MERGES)
        check_choice(cls, "layers", self.layers, defaults.D2O_LAYER_CHOICES)
        object.__setattr__(self, "_seen", {})  # layers="request": id(planned) -> variances seen

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> D2O:
        """Density: the ``d2o`` profile's per-KV-head attention variances."""
        assert profile is not None, "D2O needs its 'd2o' profile (registry.resolve_profile)"
        return cls(density=torch.as_tensor(profile.kv_scores, dtype=torch.float64),
                   sink_size=cfg.d2o_sink_size, merge=cfg.d2o_merge, layers=cfg.d2o_layers,
                   **cls.observation_kwargs(cfg))

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        super().check_model(num_layers, num_kv_heads)
        check_model_shape(type(self).__name__, "density", self.density, num_layers, num_kv_heads)

    # ------------------------------------------------------------------ layer level
    def layer_shares(self) -> torch.Tensor:
        """float64 ``[num_layers]``: ``softmax(-v)`` of the min-max normalised layer variances
        (``layers="uniform"``: ``1 / L`` each)."""
        if self.layers == "uniform":
            n = self.density.shape[0]
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        v = self.density.mean(dim=1)
        span = float(v.max() - v.min())
        v = (v - v.min()) / span if span > 0 else torch.zeros_like(v)
        return torch.softmax(-v, dim=0)

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        self.check_model(num_layers, num_kv_heads)
        if budget >= seq_len:
            return torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)
        w = effective_window(self.window_size, budget, seq_len)
        shares = self.layer_shares()
        ideal = shares * (num_layers * (budget - w))
        caps = torch.full((num_layers,), seq_len - w, dtype=torch.int64)
        per_layer = waterfill(ideal, caps, shares, num_layers * (budget - w)) + w
        return per_layer[:, None].expand(num_layers, num_kv_heads).contiguous()

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """At most ``min(B, T)`` tokens per row on average, rows of any length."""
        return average_bound_pages(seq_len, budget, num_layers, num_kv_heads, page_size)

    def layer_budgets(self, layer: int, seq_len: int, budget: int, scores: torch.Tensor,
                      planned: torch.Tensor | None) -> torch.Tensor:
        """``layers="request"``: this layer's budget from this request's attention density.

        The server compresses layer ``l`` right after its attention, before the later layers
        exist, so the allocation is sequential: ``v_l`` is the request's variance, over the
        scored prefix positions, of each KV head's attention distribution (the scores
        normalised to sum 1; the window and the sinks left out), averaged over the heads. The
        later layers' variances are predicted as the profile's times ``c``, the ratio of the
        request's to the profile's variances summed over the layers seen so far. With those
        ``L`` values min-max normalised, ``w = exp(-v)``, layer ``l`` gets the share
        ``w_l / sum_{m >= l} w_m`` of the budget the layers ``>= l`` have left (what
        ``planned[l:]`` holds beyond their windows), at most the prompt; ``planned[l + 1:]``
        is rewritten with the rest, spread by the profile's shares, so the request's total
        stays ``sum(planned)``. Other settings: ``planned[layer]``.
        """
        if self.layers != "request":
            return super().layer_budgets(layer, seq_len, budget, scores, planned)
        assert planned is not None and 0 <= layer < planned.shape[0], (
            f"D2O plans its budgets up front; got layer {layer} of {None if planned is None else list(planned.shape)}")
        L = planned.shape[0]
        w = effective_window(self.window_size, budget, seq_len)
        if budget >= seq_len or w >= seq_len:
            return planned[layer]
        seen = self._seen  # type: ignore[attr-defined]
        key = id(planned)
        if layer == 0 or key not in seen:
            if len(seen) > 256:  # requests aborted mid-prefill leave theirs: drop the oldest
                seen.pop(next(iter(seen)))
            seen[key] = []
        observed = seen[key]
        observed.append(request_variance(scores))
        prof = self.density.mean(dim=1)
        c = sum(observed) / max(float(prof[:layer + 1].sum()), 1e-30)
        v = torch.cat([torch.tensor(observed, dtype=torch.float64), c * prof[layer + 1:]])
        span = float(v.max() - v.min())
        v = (v - v.min()) / span if span > 0 else torch.zeros_like(v)
        weight = torch.exp(-v)[layer:]
        rest = planned[layer:, 0].to(torch.float64) - w  # the non-window budget left, per layer
        left = float(rest.sum())
        mine = min(int(round(left * float(weight[0] / weight.sum()))), seq_len - w, int(left))
        if layer + 1 < L:
            later = L - layer - 1
            shares = self.layer_shares()[layer + 1:]
            caps = torch.full((later,), seq_len - w, dtype=torch.int64)
            total = int(round(left)) - mine
            if total > int(caps.sum()):  # the later layers cannot hold it: this one keeps more
                mine += total - int(caps.sum())
                total = int(caps.sum())
            planned[layer + 1:] = (waterfill(shares * total / float(shares.sum()), caps, shares, total) + w)[:, None]
        else:
            seen.pop(key, None)
        planned[layer] = mine + w
        return planned[layer]

    # ------------------------------------------------------------------ token level
    def merge_dropped(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      kept: CompressedLayer, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values with the dropped tokens merged in (:func:`merge_dropped`)."""
        if self.merge == "off":
            return kept.k_flat, kept.v_flat
        return merge_dropped(k, v, keep, kept.k_flat, kept.v_flat, kept.indptr, gather=gather,
                             weighting="mean" if self.merge == "mean" else "similarity")


def request_variance(scores: torch.Tensor) -> float:
    """The mean over KV heads of the variance of a head's attention distribution.

    ``scores``: float ``[H, T]`` (``+inf`` on the window and the sinks, which are left out);
    each head's finite scores are normalised to sum 1 (a head whose scores sum to 0 counts
    as uniform, variance 0)."""
    finite = torch.isfinite(scores).all(dim=0)
    x = scores[:, finite].to(torch.float64).clamp(min=0)
    if x.shape[1] < 2:
        return 0.0
    total = x.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, x / total.clamp(min=1e-300), torch.full_like(x, 1.0 / x.shape[1]))
    return float(p.var(dim=1, unbiased=False).mean())


def merge_dropped(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, k_kept: torch.Tensor,
                  v_kept: torch.Tensor, indptr: torch.Tensor, gather=None, prev_threshold: float | None = None,
                  ema: float = DECODE_EMA, stats: dict | None = None,
                  weighting: str = "similarity") -> tuple[torch.Tensor, torch.Tensor]:
    """D2O's compensation: merge each dropped token into its most similar kept token.

    Parameters
    ----------
    k, v : torch.Tensor
        ``[H, T, D]``: the layer's prompt keys and values (not modified).
    keep : torch.Tensor
        bool ``[H, T]``: the kept tokens.
    k_kept, v_kept : torch.Tensor
        ``[N, D]``: the kept tokens, head by head in position order (``N = keep.sum()``).
    indptr : torch.Tensor
        int64 ``[H + 1]``: head ``h``'s kept tokens are rows ``indptr[h]:indptr[h+1]``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        New ``[N, D]`` keys and values (input dtype). For a dropped token ``i`` of head
        ``h``, ``s_i`` is the largest cosine similarity of its key to a kept key of
        ``h`` (ties: the earlier kept token) and ``j(i)`` that token; the threshold is
        the mean of ``s_i`` over every dropped token of the layer (of heads that keep at
        least one token). Tokens with ``s_i >= threshold`` merge, with ``weighting``.
        Computed in float32, in chunks of tokens (no ``[H, T, T]`` tensor).
    gather : callable | None
        Tensor parallelism (``policies.sharding``): ``[H, T] -> [H_all, T]`` over the ranks.
        The threshold is a statistic of the whole layer, so with ``gather`` it is the mean
        over every rank's dropped tokens (the same number, summed in the same order, as on
        one rank), and this rank takes part in the gather even when it has nothing to merge.
    prev_threshold, ema : float | None, float
        Decode-time compression (the same request and layer compressed again): the
        threshold becomes the moving average ``ema * prev_threshold + (1 - ema) * mean``
        of the previous one and this call's mean (D2O's ``alpha * threshold + belta *
        mean``, both 0.5 there). None: the mean alone (the first compression).
    stats : dict | None
        Receives ``threshold`` (float) and ``merged`` (dropped tokens merged, this rank)
        when anything was dropped; left untouched otherwise.
    weighting : {"similarity", "mean"}
        ``"similarity"`` (the paper): ``k'_j = (e k_j + sum_i e^{s_i} k_i) / (e + sum_i
        e^{s_i})`` over the tokens ``i`` with ``j(i) = j``, a softmax in which ``j``'s own
        similarity is 1; ``"mean"`` (the authors' code): ``(k_j + sum_i s_i k_i) / (1 +
        n_j)``. The same for ``v``.
    """
    if not 0.0 <= ema <= 1.0:
        raise ValueError(f"ema must be in [0, 1], got {ema}")
    if weighting not in MERGE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(MERGE_WEIGHTINGS)}, got {weighting!r}")
    num_heads, seq_len, dim = k.shape
    device = k.device
    keep = keep.to(device)
    lengths = keep.sum(dim=1)
    drop = ~keep & (lengths > 0)[:, None]
    if k_kept.shape[0] == 0 or not bool(drop.any()):
        if gather is not None:  # the other ranks' threshold needs this rank's (empty) share
            gather(torch.zeros(num_heads, seq_len, dtype=torch.float32, device=device))
            gather(torch.zeros(num_heads, seq_len, dtype=torch.float32, device=device))
        return k_kept, v_kept
    kmax = int(lengths.max())
    # kept keys per head, padded to kmax rows: rank of a kept token within its head
    rank = keep.to(torch.int64).cumsum(dim=1) - 1
    head_of, pos_of = keep.nonzero(as_tuple=True)
    kn = torch.nn.functional.normalize(k.to(torch.float32), dim=-1)
    padded = kn.new_zeros(num_heads, kmax, dim)
    padded[head_of, rank[head_of, pos_of]] = kn[head_of, pos_of]
    valid = torch.arange(kmax, device=device)[None, None, :] < lengths[:, None, None]  # [H, 1, kmax]
    best_all = torch.empty(num_heads, seq_len, dtype=torch.float32, device=device)
    arg_all = torch.empty(num_heads, seq_len, dtype=torch.int64, device=device)
    step = max(1, _SIM_CHUNK // (num_heads * kmax))
    for lo in range(0, seq_len, step):  # every token of a chunk against its head's kept keys
        sims = torch.bmm(kn[:, lo:lo + step], padded.transpose(1, 2))  # [H, n, kmax]
        sims = sims.masked_fill(~valid, float("-inf"))
        best_all[:, lo:lo + step], arg_all[:, lo:lo + step] = sims.max(dim=2)
    d_head, d_pos = drop.nonzero(as_tuple=True)
    best, arg = best_all[d_head, d_pos], arg_all[d_head, d_pos]
    if gather is None:
        threshold = best.mean()
    else:
        all_best = gather(best_all.masked_fill(~drop, 0.0))
        all_drop = gather(drop.to(torch.float32)) > 0
        threshold = all_best[all_drop].mean().to(device)
    if prev_threshold is not None:
        threshold = ema * prev_threshold + (1.0 - ema) * threshold
    merged = best >= threshold
    if stats is not None:
        stats["threshold"], stats["merged"] = float(threshold), int(merged.sum())
    src_h, src_p, sim = d_head[merged], d_pos[merged], best[merged]
    target = indptr.to(device)[src_h] + arg[merged]  # row in k_kept
    n_kept = k_kept.shape[0]
    if weighting == "similarity":  # softmax over the kept token (similarity 1) and its sources
        self_weight = math.e
        weight = torch.exp(sim)
        denom = self_weight + torch.zeros(n_kept, dtype=torch.float32, device=device).index_put_(
            (target,), weight, accumulate=True)
    else:  # the authors' code: scatter_reduce(mean, include_self) of s * k
        self_weight = 1.0
        weight = sim
        denom = 1.0 + torch.bincount(target, minlength=n_kept).to(torch.float32)
    out = []
    for full, flat in ((k, k_kept), (v, v_kept)):
        acc = flat.to(torch.float32) * self_weight  # a new tensor: index_put_ below writes into it
        acc = acc.clone() if acc.data_ptr() == flat.data_ptr() else acc
        # (index_put_ with accumulate: CPU's multi-threaded index_add_ stalls on a busy machine)
        acc.index_put_((target,), weight[:, None] * full[src_h, src_p].to(torch.float32), accumulate=True)
        out.append((acc / denom[:, None]).to(flat.dtype))
    return out[0], out[1]
