"""RazorAttention: full cache on retrieval heads, sinks + window + compensation elsewhere."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.base import KVPolicy
from headkv_sglang.policies.budgets import planned_pages
from headkv_sglang.policies.checks import (
    BadValue,
    check_float,
    check_head_table,
    check_int,
    check_model_shape,
    check_request,
    check_sinks_fit,
)
from headkv_sglang.policies.scoring import sink_recency_scores

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


@dataclass(frozen=True, kw_only=True)
class RazorAttention(KVPolicy):
    """RazorAttention: retrieval heads keep everything, the rest keep sinks + recent.

    https://arxiv.org/abs/2407.15891

    Retrieval heads (echo and induction heads, found offline) keep all ``T``
    prompt tokens. Every other head keeps the first ``sink_size`` tokens and
    the last ``B - sink_size``, and folds the tokens it drops into one
    compensation token: the mean of their keys and the mean of their values,
    attended with multiplicity ``n_dropped`` (its logit gets
    ``+log(n_dropped)``), as the paper's Eq. 5.

    Budgets are **not** bounded by ``L * H * B``: retrieval heads keep the
    whole prompt, and the compensation state is one extra entry per
    compressed head on top of ``B``.

    Parameters
    ----------
    retrieval_heads : torch.Tensor
        bool ``[num_layers, num_kv_heads]``: True where the head keeps the full
        cache. See :meth:`from_scores`.
    sink_size : int
        Initial tokens kept by non-retrieval heads (4, as StreamingLLM).
    window_size : int
        Recent tokens kept even when ``B < sink_size + window_size``.
    """

    name: ClassVar[str] = "razor"
    uses_compensation: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = False
    profile_method: ClassVar[str | None] = "razor"

    retrieval_heads: torch.Tensor = field(compare=False, repr=False)
    sink_size: int = defaults.SINK_SIZE
    window_size: int = defaults.WINDOW_SIZE

    def __post_init__(self) -> None:
        cls = type(self).__name__
        table = check_head_table(cls, "retrieval_heads", self.retrieval_heads, dtype_kind="bool")
        object.__setattr__(self, "retrieval_heads", table)
        check_int(cls, "sink_size", self.sink_size, 0)
        check_int(cls, "window_size", self.window_size, 1)

    @classmethod
    def from_scores(
        cls,
        echo: torch.Tensor,
        induction: torch.Tensor,
        *,
        echo_fraction: float = defaults.RAZOR_ECHO_FRACTION,
        induction_fraction: float = defaults.RAZOR_INDUCTION_FRACTION,
        **hyperparams: Any,
    ) -> "RazorAttention":
        """Protect the top echo and induction heads.

        The paper protects about 15% of the heads: the top 1% by echo score
        and the top 14% by induction score (the two sets may overlap).

        Parameters
        ----------
        echo, induction : torch.Tensor
            float ``[num_layers, num_kv_heads]`` head scores (query heads of a
            group aggregated).
        echo_fraction, induction_fraction : float
            Fractions in ``[0, 1]`` of all heads protected by each score;
            a non-zero fraction protects at least one head.
        **hyperparams
            Other fields (``sink_size``, ``window_size``).
        """
        name = cls.__name__
        check_float(name, "echo_fraction", echo_fraction, low=0.0, high=1.0)
        check_float(name, "induction_fraction", induction_fraction, low=0.0, high=1.0)
        echo_t = check_head_table(name, "echo", echo, dtype_kind="float")
        ind_t = check_head_table(name, "induction", induction, dtype_kind="float")
        if echo_t.shape != ind_t.shape:
            raise ValueError(
                f"echo {list(echo_t.shape)} and induction {list(ind_t.shape)} must have the same shape"
            )
        n = echo_t.numel()
        mask = torch.zeros(n, dtype=torch.bool)
        for scores, frac in ((echo_t, echo_fraction), (ind_t, induction_fraction)):
            top = math.ceil(frac * n - 1e-9)
            if top > 0:
                order = torch.sort(scores.flatten(), descending=True, stable=True).indices
                mask[order[:top]] = True
        return cls(retrieval_heads=mask.reshape(echo_t.shape), **hyperparams)

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> RazorAttention:
        """Retrieval heads from the ``razor`` profile: ``razor_fraction`` of the heads,
        its first 1% by echo score and the rest by induction score."""
        assert profile is not None, "RazorAttention needs its 'razor' head profile (registry.resolve_profile)"
        echo = torch.as_tensor(profile.kv_echo, dtype=torch.float64)
        induction = torch.as_tensor(profile.kv_induction, dtype=torch.float64)
        frac = cfg.razor_fraction
        return cls.from_scores(
            echo, induction,
            echo_fraction=min(defaults.RAZOR_ECHO_FRACTION, frac),
            induction_fraction=max(0.0, frac - defaults.RAZOR_ECHO_FRACTION),
            sink_size=cfg.sink_size, window_size=cfg.obs_window,
        )

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        check_sinks_fit(cfg, bad, changed)

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        super().check_model(num_layers, num_kv_heads)
        check_model_shape(
            type(self).__name__, "retrieval_heads", self.retrieval_heads, num_layers, num_kv_heads
        )

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        self.check_model(num_layers, num_kv_heads)
        full = torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)
        local = torch.full_like(full, min(budget, seq_len))
        return torch.where(self.retrieval_heads, full, local)

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """Exact: the plan depends on positions only, and selection keeps exactly the plan.

        The every-head-keeps-``T`` bound over-reserved several-fold (5x for T = 1200,
        B = 64, 15% retrieval heads), and a long prompt's could exceed the whole pool,
        so such a request was admitted unreserved and could find the pool full.
        """
        planned = self.plan_budgets(seq_len, budget, num_layers, num_kv_heads)
        return planned_pages(planned.clamp(max=seq_len), page_size)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor:
        """float32 ``[num_kv_heads, T]``: sinks above recent above old; ``q_win`` unused."""
        return sink_recency_scores(k.shape[0], k.shape[1], self.window_size, self.sink_size, k.device)
