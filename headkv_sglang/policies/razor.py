"""RazorAttention: full cache on retrieval heads, sinks + window + compensation elsewhere."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.base import KVPolicy, sink_size_field
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
from headkv_sglang.policies.params import Param, param
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
    compressed head on top of ``B``. **Budget-matched** (``head_order`` set,
    ``--kv-razor-heads budget``, the HeadKV paper's comparison): the number of
    retrieval heads follows from the prompt and the budget instead, see
    :meth:`retrieval_mask`, so that everything held, compensation states
    included, is at most ``L * H * B``.

    Parameters
    ----------
    retrieval_heads : torch.Tensor
        bool ``[num_layers, num_kv_heads]``: True where the head keeps the full
        cache. See :meth:`from_scores`.
    sink_size : int
        Initial tokens kept by non-retrieval heads (4, as StreamingLLM).
    window_size : int
        Recent tokens kept even when ``B < sink_size + window_size``.
    head_order : torch.Tensor | None
        int64 ``[num_layers * num_kv_heads]``: every head, most retrieval-like
        first (flattened ``layer * num_kv_heads + head``). When set, the policy
        is budget-matched and ``retrieval_heads`` is only its fixed-fraction
        fallback for :meth:`check_model`.
    """

    name: ClassVar[str] = "razor"
    uses_compensation: ClassVar[bool] = True
    needs_queries: ClassVar[bool] = False
    profile_method: ClassVar[str | None] = "razor"

    #: Settings from_config reads to choose ``retrieval_heads`` / ``head_order`` (not fields).
    razor_fraction: ClassVar[Param] = param(
        "razor_fraction", defaults.RAZOR_FRACTION, "RazorAttention: fraction of heads kept whole.", low=0.0, high=1.0)
    razor_heads: ClassVar[Param] = param(
        "razor_heads", "fraction", "RazorAttention: 'fraction' (--kv-razor-fraction of the heads keep everything) "
        "or 'budget' (as many heads as the budget pays for: the KV held stays within L*H*budget).",
        choices=defaults.RAZOR_HEADS)

    retrieval_heads: torch.Tensor = field(compare=False, repr=False)
    sink_size: int = sink_size_field()
    window_size: int = defaults.WINDOW_SIZE
    head_order: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        table = check_head_table(cls, "retrieval_heads", self.retrieval_heads, dtype_kind="bool")
        object.__setattr__(self, "retrieval_heads", table)
        check_int(cls, "sink_size", self.sink_size, 0)
        check_int(cls, "window_size", self.window_size, 1)
        if self.head_order is not None:
            order = torch.as_tensor(self.head_order, dtype=torch.int64).flatten()
            if not torch.equal(torch.sort(order).values, torch.arange(table.numel())):
                raise ValueError(f"{cls}.head_order must be a permutation of the {table.numel()} heads")
            object.__setattr__(self, "head_order", order)

    @staticmethod
    def ranking(echo: torch.Tensor, induction: torch.Tensor,
                echo_fraction: float = defaults.RAZOR_ECHO_FRACTION) -> torch.Tensor:
        """Every head, most retrieval-like first: the top ``echo_fraction`` by echo score, then
        the rest by induction score (the paper's two kinds, in its proportions). Ties go to
        the lower index."""
        n = echo.numel()
        top_echo = math.ceil(echo_fraction * n - 1e-9)
        by_echo = torch.sort(echo.flatten(), descending=True, stable=True).indices[:top_echo]
        by_induction = torch.sort(induction.flatten(), descending=True, stable=True).indices
        rest = by_induction[~torch.isin(by_induction, by_echo)]
        return torch.cat([by_echo, rest])

    def retrieval_mask(self, seq_len: int, budget: int) -> tuple[torch.Tensor, int]:
        """``(mask, b)``: the heads that keep all ``seq_len`` tokens and what the others keep.

        Fixed fraction: ``retrieval_heads`` and ``b = min(budget, seq_len)``. Budget-matched:
        with ``N`` heads and ``m = sink_size + 1`` (sinks plus one recent token), the most
        retrieval-like ``R`` heads of ``head_order``, ``R`` the largest with
        ``R * T + (N - R) * (m + 1) <= N * B`` (each other head also holds one compensation
        state), and the others share the rest: ``b = (N * B - R * T) // (N - R) - 1``, at
        least ``min(m, T)``.
        """
        if self.head_order is None:
            return self.retrieval_heads, min(budget, seq_len)
        n = self.retrieval_heads.numel()
        total, m = n * budget, min(self.sink_size + 1, seq_len)
        r = 0
        if seq_len > m + 1:
            r = max(0, min(n, (total - n * (m + 1)) // (seq_len - m - 1)))
        else:
            r = n if total >= n * seq_len else 0
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.head_order[:r]] = True
        b = seq_len if r == n else max(m, min(seq_len, (total - r * seq_len) // (n - r) - 1))
        return mask.reshape(self.retrieval_heads.shape), b

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
        echo, induction = (_group_max(profile, t) for t in ("echo", "induction"))
        frac = cfg.razor_fraction
        policy = cls.from_scores(
            echo, induction,
            echo_fraction=min(defaults.RAZOR_ECHO_FRACTION, frac),
            induction_fraction=max(0.0, frac - defaults.RAZOR_ECHO_FRACTION),
            **cls.config_kwargs(cfg),
        )
        if cfg.razor_heads == "budget":
            object.__setattr__(policy, "head_order", cls.ranking(echo, induction))
        return policy

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        check_sinks_fit(cfg, bad, changed)
        if cfg.decode_budget:
            # its retrieval heads keep every token and the others a compensation state:
            # a uniform decode budget would break both
            if "policy" in changed and "decode_budget" not in changed:  # blame what the request set
                raise bad("policy", cfg.policy, "razor does not support the server's decode budget; "
                          "send kv_decode_budget 0 with it")
            raise bad("decode_budget", cfg.decode_budget, "decode-phase compression is not supported with razor (use 0)")

    @classmethod
    def min_budget(cls, cfg: KVPolicyConfig) -> int:
        """The sinks plus one recent token (and the explicit window)."""
        return max(cfg.window, cfg.sink_size + 1)

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
        mask, b = self.retrieval_mask(seq_len, budget)
        full = torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)
        return torch.where(mask, full, torch.full_like(full, b))

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

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        """float32 ``[num_kv_heads, T]``: sinks above recent above old; ``q_win`` unused."""
        return sink_recency_scores(k.shape[0], k.shape[1], self.window_size, self.sink_size, k.device)


def _group_max(profile: Any, table: str) -> torch.Tensor:
    """``[L, H_kv]``: the strongest query head of each GQA group (a KV head serves a retrieval
    query head if any of its query heads is one; the group mean would dilute it)."""
    per_q = torch.as_tensor(getattr(profile, table), dtype=torch.float64)
    num_layers, num_q = per_q.shape
    return per_q.reshape(num_layers, profile.num_kv_heads, num_q // profile.num_kv_heads).amax(dim=-1)
