"""HeadKV: per-head budgets from an offline head-importance profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import average_bound_pages, effective_window, waterfill
from headkv_sglang.policies.checks import check_float, check_head_table, check_model_shape, check_request
from headkv_sglang.policies.observation import ObservationWindowPolicy
from headkv_sglang.policies.params import hyper

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


@dataclass(frozen=True, kw_only=True)
class HeadKV(ObservationWindowPolicy):
    """HeadKV: a shared budget pool split across heads by measured importance.

    https://arxiv.org/abs/2410.19258

    Follows ``ReasonSnapKVCluster`` (FYYFU/HeadKV, ``headkv/snapkv_utils.py``)
    with ``base = B - w`` the prefix budget of an average head::

        s        = importance / importance.sum();  s = s**temp / sum(s**temp)
        pool     = (base // beta) * L * H          # the shared pool
        min_num  = base - base // beta             # every head's floor
        budget_h = w + min_num + s_h * pool

    Differences from the reference code, all keeping its intent:

    * budgets are per KV head (the profile aggregates each group's query
      heads), not per query head after ``repeat_kv``;
    * largest-remainder rounding instead of ``round()``, so the total is
      exactly ``L * H * B``, never more;
    * a head whose budget exceeds the prompt is clamped to ``T`` and its excess
      goes to the heads still below ``T`` in proportion to their importance,
      repeated until stable (the reference code keeps ``T`` and loses the rest).

    Parameters
    ----------
    importance : torch.Tensor
        float ``[num_layers, num_kv_heads]``, ``>= 0``: head importance scores
        (Retrieval-Reasoning heads, ``Important_Head/``), measured on the
        served model. Copied to the CPU in float64.
    beta : float
        Pool size: each head contributes ``base // beta`` tokens to the shared
        pool. Close to 1 means nearly all of the budget is shared (the HeadKV
        docs/policies-and-profiles.md sweeps 1.005, 1.01, 1.1, 1.2, 1.5, 2, 5, 10 with no single
        default; 1.005 is the first value of its sweep for budgets 128-512).
        Beta is also the profile's floor: mixing a share ``f`` of the uniform
        split into ``s`` gives the plan of ``beta / (1 - f)`` (exactly when both
        pools are whole tokens), so a sparse profile (heads scoring 0) is
        smoothed by raising beta, not by another knob. The default is
        calibrated (docs/policies-and-profiles.md, HeadKV's beta).
    temp : float
        Exponent sharpening (> 1) or flattening (< 1) the normalised scores
        (``temp`` in the reference code, 1 in every published run).
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "headkv"
    profile_method: ClassVar[str | None] = "r2"

    importance: torch.Tensor = field(compare=False, repr=False)
    beta: float = hyper(defaults.HEADKV_BETA, "HeadKV pool parameter beta (default 1.005, the paper's).",
                        low=1.0, high=1e6)
    temp: float = defaults.HEADKV_TEMP

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        table = check_head_table(cls, "importance", self.importance, dtype_kind="float")
        object.__setattr__(self, "importance", table)
        check_float(cls, "beta", self.beta, low=1.0)
        check_float(cls, "temp", self.temp, low=0.0, low_inclusive=False)

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> HeadKV:
        """Importance: the profile's per-KV-head Retrieval-Reasoning (``r2``) scores."""
        assert profile is not None, "HeadKV needs its 'r2' head profile (registry.resolve_profile)"
        importance = torch.as_tensor(profile.kv_scores, dtype=torch.float64)
        return cls(importance=importance, **cls.config_kwargs(cfg))

    @classmethod
    def from_profile(
        cls, profile_scores: torch.Tensor, *, num_kv_heads: int | None = None, **hyperparams: Any
    ) -> "HeadKV":
        """Build from a head-importance profile.

        Parameters
        ----------
        profile_scores : torch.Tensor
            float ``[num_layers, num_kv_heads]``, or ``[num_layers,
            num_q_heads]`` together with ``num_kv_heads``, in which case the
            query heads of each group are averaged (HeadKV's published
            profiles are per query head).
        num_kv_heads : int | None
            The served model's KV heads, when the profile is per query head.
        **hyperparams
            Other fields (``beta``, ``window_size``, ...).
        """
        scores = torch.as_tensor(profile_scores)
        if num_kv_heads is not None and scores.dim() == 2 and scores.shape[1] != num_kv_heads:
            if num_kv_heads < 1 or scores.shape[1] % num_kv_heads != 0:
                raise ValueError(
                    f"profile has {scores.shape[1]} heads per layer, not a multiple of "
                    f"num_kv_heads={num_kv_heads}"
                )
            group = scores.shape[1] // num_kv_heads
            scores = scores.to(torch.float64).reshape(scores.shape[0], num_kv_heads, group).mean(-1)
        return cls(importance=scores, **hyperparams)

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        super().check_model(num_layers, num_kv_heads)
        check_model_shape(type(self).__name__, "importance", self.importance, num_layers, num_kv_heads)

    def head_shares(self) -> torch.Tensor:
        """float64 ``[num_layers, num_kv_heads]`` normalised shares ``s`` (sum 1)."""
        s = self.importance / self.importance.sum()
        s = s.pow(self.temp)
        return s / s.sum()

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        self.check_model(num_layers, num_kv_heads)
        n = num_layers * num_kv_heads
        if budget >= seq_len:
            return torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)
        w = effective_window(self.window_size, budget, seq_len)
        base = budget - w
        unit = int(base // self.beta)
        min_num = base - unit
        shares = self.head_shares().flatten()
        ideal = min_num + shares * (unit * n)
        caps = torch.full((n,), seq_len - w, dtype=torch.int64)
        # Clamp and refill on the real-valued plan, then round once: with no
        # overflow this is exactly HeadKV's plan rounded by largest remainder.
        rounded = waterfill(ideal, caps, shares, base * n)
        return (rounded + w).reshape(num_layers, num_kv_heads)

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """At most ``min(B, T)`` tokens per row on average, rows of any length."""
        return average_bound_pages(seq_len, budget, num_layers, num_kv_heads, page_size)
