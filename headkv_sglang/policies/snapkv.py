"""SnapKV: uniform per-head budgets, observation-window scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headkv_sglang.policies.budgets import uniform_pages
from headkv_sglang.policies.checks import check_request
from headkv_sglang.policies.observation import ObservationWindowPolicy


@dataclass(frozen=True, kw_only=True)
class SnapKV(ObservationWindowPolicy):
    """SnapKV: every KV head keeps the same number of top-scored tokens.

    https://arxiv.org/abs/2404.14469

    Every head keeps ``min(B, T)`` tokens: the observation window plus the
    prefix positions the window's queries attend to most (see
    :func:`~headkv_sglang.policies.scoring.observation_window_scores`).

    Parameters
    ----------
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "snapkv"

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        return torch.full((num_layers, num_kv_heads), min(budget, seq_len), dtype=torch.int64)

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """Exact: every row keeps ``min(B, T)`` tokens."""
        return uniform_pages(num_layers * num_kv_heads, min(seq_len, budget), page_size)
