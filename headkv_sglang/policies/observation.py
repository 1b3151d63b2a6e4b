"""The shared base of the policies that rank tokens with SnapKV's observation window."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.base import KVPolicy
from headkv_sglang.policies.base import sink_size_field
from headkv_sglang.policies.checks import BadValue, check_choice, check_int, check_sinks_fit, check_window_fits
from headkv_sglang.policies.params import field_param, hyper
from headkv_sglang.policies.scoring import observation_window_scores, pool_mass

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig

PoolingKind = Literal["maxpool", "avgpool"]
GqaAggregation = Literal["mean", "max"]


@dataclass(frozen=True, kw_only=True)
class ObservationWindowPolicy(KVPolicy):
    """Base of the policies that rank tokens with SnapKV's observation window.

    Parameters
    ----------
    window_size : int
        Observation window ``w``: the last ``w`` prompt tokens are always
        kept, and score the others unless the caller passes other scoring
        queries (``q_end``: the request's question, see ``headkv_sglang.question``). PyramidKV's LongBench scripts use 8 (and
        so did this project's best SmolLM2 measurements); SnapKV/AdaKV's code
        default is 32. The server sets it from the budget
        (``KVPolicyConfig.obs_window``).
    kernel_size : int
        Odd width of the stride-1 pooling that smooths the scores (13,
        measured here; 7 in SnapKV, PyramidKV, AdaKV and HeadKV).
    pooling : {"maxpool", "avgpool"}
        Pooling kind ("maxpool" in all four projects' scripts).
    pool_shift : int
        The pooling window moved that many tokens to the past, at most
        ``kernel_size // 2`` (a window ending at the token), so the tokens right after
        an attended phrase are kept with it (0: centred, as SnapKV; see
        ``observation_window_scores``). Measured, not better on the needle grid
        (docs/policies-and-profiles.md): 0 by default.
    gqa_agg : {"mean", "max"}
        How the query heads of a KV head's group are combined.
    agnostic_kernel_size : int
        Odd width of the max pooling of question-agnostic scores (:meth:`scores_from_mass`;
        1: none, as KVzip). The server sets it from ``--kv-agnostic-kernel``.
    """

    window_size: int = defaults.WINDOW_SIZE  # the server's --kv-window (KVPolicyConfig.obs_window)
    kernel_size: int = hyper(defaults.KERNEL_SIZE, "SnapKV pooling kernel (odd).", low=1, high=63, odd=True)
    pooling: PoolingKind = hyper(defaults.POOLING, "SnapKV pooling.", choices=defaults.POOLINGS)
    pool_shift: int = hyper(defaults.POOL_SHIFT, "Moves the score pooling window this many tokens to the past "
                            "(at most --kv-kernel-size // 2), so the tokens right after an attended phrase are "
                            "kept with it (default 0: centred, as SnapKV).", low=0, high=31)
    gqa_agg: GqaAggregation = defaults.GQA_AGG  # type: ignore[assignment]
    agnostic_kernel_size: int = 1  # the server's --kv-agnostic-kernel (1: none, as KVzip)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        check_int(cls, "window_size", self.window_size, 1)
        check_int(cls, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"{cls}.kernel_size must be odd (the pooling window has a middle token), got {self.kernel_size}"
            )
        check_choice(cls, "pooling", self.pooling, defaults.POOLINGS)
        check_int(cls, "pool_shift", self.pool_shift, 0)
        check_choice(cls, "gqa_agg", self.gqa_agg, defaults.GQA_AGGREGATIONS)
        check_int(cls, "agnostic_kernel_size", self.agnostic_kernel_size, 1)
        if self.agnostic_kernel_size % 2 == 0:
            raise ValueError(f"{cls}.agnostic_kernel_size must be odd, got {self.agnostic_kernel_size}")

    @staticmethod
    def observation_kwargs(cfg: KVPolicyConfig) -> dict[str, Any]:
        """The scoring fields as the server config sets them (window: ``cfg.obs_window``)."""
        return dict(window_size=cfg.obs_window, kernel_size=cfg.kernel_size, pooling=cfg.pooling,
                    pool_shift=cfg.pool_shift, agnostic_kernel_size=cfg.agnostic_kernel)

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        check_window_fits(cfg, bad, changed)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        return observation_window_scores(
            q_win, k, self.window_size, self.kernel_size, self.pooling, self.gqa_agg, q_end,
            self.pool_shift,
        )

    def scores_from_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """Scores from question-agnostic attention masses (``mass``: ``[num_kv_heads, group, T]``,
        :func:`~headkv_sglang.policies.scoring.max_attention` over the document's own or its
        repetition's queries), aggregated as KVzip does: the most of the group's query heads, after a
        max pooling of width ``agnostic_kernel_size`` over positions (1, the default: none, as
        KVzip); ``+inf`` on the last ``window_size`` tokens."""
        num_kv_heads, _, seq_len = mass.shape
        prefix = seq_len - min(self.window_size, seq_len)
        out = torch.full((num_kv_heads, seq_len), math.inf, dtype=torch.float32, device=mass.device)
        if prefix:
            out[:, :prefix] = pool_mass(mass[..., :prefix], self.agnostic_kernel_size, "maxpool", "max")
        return out


@dataclass(frozen=True, kw_only=True)
class SinkObservationPolicy(ObservationWindowPolicy):
    """SnapKV's scores with the first ``sink_size`` prompt tokens always kept (D2O, PoD).

    Parameters
    ----------
    sink_size : int
        First prompt tokens scored ``+inf`` (kept first after the window).
    """

    sink_size: int = sink_size_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(type(self).__name__, "sink_size", self.sink_size, 0)

    @classmethod
    def sink_setting(cls) -> str:
        """The setting (``KVPolicyConfig`` attribute) the ``sink_size`` field is declared as:
        ``sink_size`` (shared with StreamingLLM and RazorAttention), D2O's ``d2o_sink_size``."""
        p = field_param(next(f for f in dataclasses.fields(cls) if f.name == "sink_size"))
        assert p is not None, f"{cls.__name__}.sink_size must be declared with hyper()"
        return p.name

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        check_window_fits(cfg, bad, changed)
        check_sinks_fit(cfg, bad, changed, cls.sink_setting())

    @classmethod
    def min_budget(cls, cfg: KVPolicyConfig) -> int:
        """The sinks plus one recent token (and the explicit window)."""
        return max(cfg.window, getattr(cfg, cls.sink_setting()) + 1)

    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        """SnapKV's scores with the first ``sink_size`` tokens at ``+inf``."""
        scores = super().token_scores(q_win, k, layer, q_end)
        scores[:, :self.sink_size] = float("inf")
        return scores

    def scores_from_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """:meth:`ObservationWindowPolicy.scores_from_mass` with the sinks at ``+inf``."""
        scores = super().scores_from_mass(mass)
        scores[:, :self.sink_size] = float("inf")
        return scores
