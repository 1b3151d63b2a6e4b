"""PyramidKV: budgets that shrink linearly from the first to the last layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import average_bound_pages, effective_window, waterfill
from headkv_sglang.policies.checks import check_float, check_request
from headkv_sglang.policies.observation import ObservationWindowPolicy
from headkv_sglang.policies.params import hyper


@dataclass(frozen=True, kw_only=True)
class PyramidKV(ObservationWindowPolicy):
    """PyramidKV: pyramidal layer budgets, SnapKV selection within each head.

    https://arxiv.org/abs/2406.02069

    With ``base = B - w`` the prefix budget of an average head, PyramidKV's
    ``PyramidKVCluster.update_kv`` (Zefan-Cai/PyramidKV,
    ``pyramidkv/pyramidkv_utils.py``) sets ``min_num = base // beta``,
    ``max_num = 2 * base - min_num`` (when ``max_num >= T - w``:
    ``max_num = T - w`` and ``min_num = 2 * base - max_num``) and gives layer
    ``l`` the prefix budget ``max_num - l * (max_num - min_num) / (L - 1)``,
    whose mean is ``base``. Unlike the reference code, which floors the step
    and so loses up to ``L - 1`` tokens per head, the layer budgets here are
    rounded by largest remainder so that the total is exactly
    ``L * H * min(B, T)``. All heads of a layer share its budget.

    Parameters
    ----------
    beta : float
        Steepness: the last layer gets about ``base / beta`` (20 in the
        PyramidKV code and in kvpress's ``PyramidKVPress``).
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "pyramidkv"

    beta: float = hyper(defaults.PYRAMID_BETA, "PyramidKV beta: the last layer keeps about 1/beta of the average "
                        "prefix budget.", name="pyramid_beta", low=1.0, high=1e6, request=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(type(self).__name__, "beta", self.beta, low=1.0)

    def layer_prefix_budgets(self, seq_len: int, budget: int, num_layers: int) -> torch.Tensor:
        """float64 ``[num_layers]`` real prefix budgets before rounding (``B < T``)."""
        w = effective_window(self.window_size, budget, seq_len)
        base = budget - w
        prefix = seq_len - w
        min_num = float(base // self.beta)
        max_num = 2.0 * base - min_num
        if max_num >= prefix:
            max_num = float(prefix)
            min_num = 2.0 * base - max_num
        if num_layers == 1:
            return torch.tensor([float(base)], dtype=torch.float64)
        step = (max_num - min_num) / (num_layers - 1)
        return max_num - step * torch.arange(num_layers, dtype=torch.float64)

    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        if budget >= seq_len:
            return torch.full((num_layers, num_kv_heads), seq_len, dtype=torch.int64)
        w = effective_window(self.window_size, budget, seq_len)
        ideal = self.layer_prefix_budgets(seq_len, budget, num_layers).clamp(min=0.0)
        caps = torch.full((num_layers,), seq_len - w, dtype=torch.int64)
        prefix = waterfill(ideal, caps, ideal, num_layers * (budget - w))
        per_layer = prefix + w
        return per_layer[:, None].expand(num_layers, num_kv_heads).contiguous()

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """At most ``min(B, T)`` tokens per row on average, rows of any length."""
        return average_bound_pages(seq_len, budget, num_layers, num_kv_heads, page_size)
