"""Ada-KV: each layer's budget split across its heads by the scores themselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import average_bound_pages, effective_window
from headkv_sglang.policies.checks import check_float, check_request
from headkv_sglang.policies.observation import ObservationWindowPolicy
from headkv_sglang.policies.params import hyper


@dataclass(frozen=True, kw_only=True)
class AdaKV(ObservationWindowPolicy):
    """Ada-KV: adaptive per-head budgets from a layer-wide top-k (Ada-SnapKV).

    https://arxiv.org/abs/2407.11550

    Per layer, with ``base = B - w``: every head keeps its window and its own
    ``floor(floor_alpha * base)`` best prefix tokens (the safeguard); the rest
    of the layer's ``H * base`` prefix budget goes to the best remaining
    (head, position) pairs of the whole layer, compared by score. A head's
    budget is what it won, and since the layer-wide ranking preserves each
    head's own ranking (ties to the lower position), :meth:`select` keeps
    exactly the tokens that won. The layer total is ``H * min(B, T)``.

    This is the safeguard formulation of kvpress's ``AdaKVPress`` (the
    floor is reserved up front); FFY0/AdaKV's ``AdaptiveSnapKVCluster``
    instead rescales the top-k counts as ``round(count * (1 - alpha) +
    floor)``, which only approximately meets the total.

    Parameters
    ----------
    floor_alpha : float
        Safeguard fraction in ``[0, 1]`` (``alpha_safeguard = 0.20`` in
        kvpress and the Ada-KV paper's GQA experiments; the FFY0/AdaKV README
        example uses 0.5).
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "adakv"

    floor_alpha: float = hyper(defaults.FLOOR_ALPHA, "Ada-KV safeguard floor: each head keeps this share of "
                               "its own best tokens before the layer-wide contest.", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(type(self).__name__, "floor_alpha", self.floor_alpha, low=0.0, high=1.0)

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> None:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        return None

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """At most ``min(B, T)`` tokens per row on average, rows of any length."""
        return average_bound_pages(seq_len, budget, num_layers, num_kv_heads, page_size)

    def layer_budgets(
        self,
        layer: int,
        seq_len: int,
        budget: int,
        scores: torch.Tensor,
        planned: torch.Tensor | None,
    ) -> torch.Tensor:
        """int64 ``[num_kv_heads]`` (CPU) budgets from float32 ``scores [num_kv_heads, T]``."""
        check_request(seq_len, budget)
        if scores.dim() != 2 or scores.shape[1] != seq_len:
            raise ValueError(f"scores must be [num_kv_heads, {seq_len}], got {list(scores.shape)}")
        num_heads = scores.shape[0]
        w = effective_window(self.window_size, budget, seq_len)
        if budget >= seq_len or budget <= w:
            return torch.full((num_heads,), min(budget, seq_len), dtype=torch.int64)
        base = budget - w
        prefix = seq_len - min(self.window_size, seq_len)
        floor = int(self.floor_alpha * base)
        # Each head's prefix scores in its own order; the first `floor` ranks
        # are the safeguard, the rest compete layer-wide.
        ranked = torch.sort(scores[:, :prefix], dim=1, descending=True, stable=True).values
        contest = ranked[:, floor:].reshape(-1)
        won = torch.sort(contest, descending=True, stable=True).indices[: num_heads * (base - floor)]
        counts = torch.bincount(won // (prefix - floor), minlength=num_heads).to("cpu")
        return counts.to(torch.int64) + floor + w
