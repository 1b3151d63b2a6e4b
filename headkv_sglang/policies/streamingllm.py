"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.base import KVPolicy, sink_size_field
from headkv_sglang.policies.budgets import uniform_pages
from headkv_sglang.policies.checks import BadValue, check_int, check_request, check_sinks_fit
from headkv_sglang.policies.scoring import sink_recency_scores

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig


@dataclass(frozen=True, kw_only=True)
class StreamingLLM(KVPolicy):
    """StreamingLLM: keep the attention sinks and the most recent tokens.

    https://arxiv.org/abs/2309.17453

    Every head keeps the first ``sink_size`` prompt tokens and the last
    ``B - sink_size`` (``min(B, T)`` in all). Scores are positional, so no
    queries are needed.

    Parameters
    ----------
    sink_size : int
        Initial tokens always kept (4 in the paper).
    window_size : int
        Recent tokens kept even when ``B < sink_size + window_size``; the
        recent part is otherwise ``B - sink_size`` long anyway.
    """

    name: ClassVar[str] = "streamingllm"
    needs_queries: ClassVar[bool] = False

    sink_size: int = sink_size_field()
    window_size: int = defaults.WINDOW_SIZE

    def __post_init__(self) -> None:
        cls = type(self).__name__
        check_int(cls, "sink_size", self.sink_size, 0)
        check_int(cls, "window_size", self.window_size, 1)

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        check_sinks_fit(cfg, bad, changed)

    @classmethod
    def min_budget(cls, cfg: KVPolicyConfig) -> int:
        """The sinks plus one recent token (and the explicit window)."""
        return max(cfg.window, cfg.sink_size + 1)

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

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        """float32 ``[num_kv_heads, T]``: sinks above recent above old; ``q_win`` unused."""
        return sink_recency_scores(k.shape[0], k.shape[1], self.window_size, self.sink_size, k.device)
