"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headkv_sglang.policies.base import KVPolicy, check_int, check_request, sink_recency_scores


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

    sink_size: int = 4
    window_size: int = 8

    def __post_init__(self) -> None:
        cls = type(self).__name__
        check_int(cls, "sink_size", self.sink_size, 0)
        check_int(cls, "window_size", self.window_size, 1)

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        return torch.full((num_layers, num_kv_heads), min(budget, seq_len), dtype=torch.int64)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor:
        """float32 ``[num_kv_heads, T]``: sinks above recent above old; ``q_win`` unused."""
        return sink_recency_scores(k.shape[0], k.shape[1], self.window_size, self.sink_size, k.device)
