"""FullKV: the uncompressed baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies.base import KVPolicy
from headkv_sglang.policies.checks import check_int, check_request

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


@dataclass(frozen=True, kw_only=True)
class FullKV(KVPolicy):
    """FullKV: keep every prompt token (the quality reference).

    Ignores ``budget``; useful to run the ragged serving path without any
    compression. The server does not compress under it (``compresses`` is
    False): requests stay in SGLang's own pool.

    Parameters
    ----------
    window_size : int
        Unused by the selection (everything is kept); it only tells the
        backend how many queries to hand over, so it stays >= 1.
    """

    name: ClassVar[str] = "full"
    needs_queries: ClassVar[bool] = False
    compresses: ClassVar[bool] = False

    window_size: int = 1

    def __post_init__(self) -> None:
        check_int(type(self).__name__, "window_size", self.window_size, 1)

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> FullKV:
        return cls()

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        return torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)

    # max_pages: the default (every row keeps the whole prompt) is exact here.

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        """float32 ``[num_kv_heads, T]`` of ``+inf``: nothing is ever ranked."""
        return torch.full(k.shape[:2], math.inf, dtype=torch.float32, device=k.device)
