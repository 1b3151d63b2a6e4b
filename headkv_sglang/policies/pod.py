"""PoD: proximal tokens attended in full, distant tokens' attention shared between layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import effective_window, uniform_pages
from headkv_sglang.policies.checks import check_float, check_model_shape, check_request
from headkv_sglang.policies.observation import SinkObservationPolicy
from headkv_sglang.policies.params import hyper

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


def sharing_map(similarity: torch.Tensor, share: float) -> torch.Tensor:
    """bool ``[L, H]``: the (layer, KV head) rows that reuse the layer below's distant attention.

    ``round(share * L * H)`` rows of layers >= 1 are chosen, the most similar to the layer
    below first (``similarity[l, h]``: how alike the distant attention of layer ``l`` and
    ``l - 1`` is on head ``h``; ties to the lower layer, then head). A row is taken only if
    neither the row below nor the row above it (same head) is taken: a sharing row stores
    no distant keys, so it cannot be the source of another. Fewer are taken when no more
    fit (at most ``ceil((L - 1) / 2)`` per head).
    """
    L, H = similarity.shape
    target = round(share * L * H)
    taken = torch.zeros(L, H, dtype=torch.bool)
    if target <= 0 or L < 2:
        return taken
    sim = similarity.to(torch.float64)
    order = sorted(((-float(sim[l, h]), l, h) for l in range(1, L) for h in range(H)))
    n = 0
    for _, l, h in order:
        if taken[l - 1, h] or (l + 1 < L and taken[l + 1, h]):
            continue
        taken[l, h] = True
        n += 1
        if n == target:
            break
    return taken


@dataclass(frozen=True, kw_only=True)
class PoD(SinkObservationPolicy):
    """PoD ("Proximal over Distant", Ma et al., arXiv 2412.02252) at inference time, with
    SnapKV's token selection ("PoD + SnapKV").

    **Tokens.** A row's *proximal* tokens are the first ``sink_size`` and the last
    ``window_size`` (the observation window); the others are *distant*. Every (layer, KV
    head) keeps ``min(B, T)`` tokens as SnapKV does (the window, the sinks, then the
    distant tokens the scoring queries attend to most); ``B >= T`` keeps them all (PoD
    without token selection).

    **Sharing.** A *sharing* row (layer ``l``, KV head ``h``; :func:`sharing_map` from the
    ``pod`` profile's similarities and ``share``) keeps the same tokens as row ``(l - 1,
    h)`` and stores only the **values** of its distant tokens: at attention time their
    logits are layer ``l - 1``'s (its queries against its keys, head by head of the GQA
    group), joined with the row's own proximal and decoded tokens in one softmax, and
    applied to layer ``l``'s values. Its distant keys are never stored (values-only pages
    hold two pages' worth of tokens).

    Differences from the paper: its layer groups share one layer's scores across the group
    and are fixed by position; here pairs of consecutive layers per KV head, chosen by
    measured similarity (``python -m headkv_sglang.profile --method pod``), so a head can
    share where its attention is alike and not elsewhere; and no continued pre-training
    (the paper's "PoD w/o CPT" setting).

    Parameters
    ----------
    similarity : torch.Tensor
        float ``[num_layers, num_kv_heads]`` in ``[0, 1]`` (layer 0: unused).
    share : float
        Target share of all rows that share, in ``[0, 0.5]``.
    sink_size : int
        First prompt tokens always kept and proximal.
    window_size, kernel_size, pooling, gqa_agg
        See :class:`~headkv_sglang.policies.observation.ObservationWindowPolicy`.
    """

    name: ClassVar[str] = "pod"
    profile_method: ClassVar[str | None] = "pod"
    links_layers: ClassVar[bool] = True
    row_pages_slack: ClassVar[int] = 1

    similarity: torch.Tensor = field(compare=False, repr=False)
    share: float = hyper(defaults.POD_SHARE, "PoD: share of the (layer, KV head) rows, in [0, 0.5], that reuse "
                         "the layer below's attention over distant tokens and store no distant keys (the most "
                         "similar pairs by the 'pod' profile).", name="pod_share", low=0.0, high=0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        table = torch.as_tensor(self.similarity)
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"{cls}.similarity must be a float [num_layers, num_kv_heads] tensor, "
                             f"got {table.dtype} {list(table.shape)}")
        table = table.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"{cls}.similarity must be finite")
        object.__setattr__(self, "similarity", table)
        check_float(cls, "share", self.share, low=0.0, high=0.5)
        object.__setattr__(self, "_sharing", sharing_map(table, self.share))

    @property
    def sharing(self) -> torch.Tensor:
        """bool ``[num_layers, num_kv_heads]``: :func:`sharing_map` of this policy."""
        return self._sharing  # type: ignore[attr-defined]

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> PoD:
        """Similarity: the ``pod`` profile's per-KV-head similarity to the layer below."""
        assert profile is not None, "PoD needs its 'pod' profile (registry.resolve_profile)"
        return cls(similarity=torch.as_tensor(profile.kv_scores, dtype=torch.float64), share=cfg.pod_share,
                   sink_size=cfg.sink_size, **cls.observation_kwargs(cfg))

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        super().check_model(num_layers, num_kv_heads)
        check_model_shape(type(self).__name__, "similarity", self.similarity, num_layers, num_kv_heads)

    def plan_budgets(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        check_request(seq_len, budget, num_layers, num_kv_heads)
        self.check_model(num_layers, num_kv_heads)
        return torch.full((num_layers, num_kv_heads), min(budget, seq_len), dtype=torch.int64)

    def max_pages(self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int) -> int:
        """Every row keeps ``min(B, T)`` tokens; a sharing row splits them into pages of
        whole tokens and values-only pages, ``ceil(a / p) + ceil(b / 2p) <= ceil((a + b) / p) + 1``."""
        rows = num_layers * num_kv_heads
        return uniform_pages(rows, min(seq_len, budget), page_size) + int(self.sharing.sum())

    def link_layer(self, layer: int, keep: torch.Tensor, prev_keep: torch.Tensor | None, budget: int,
                   heads: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, values_only)`` of ``layer``, both bool ``[H, T]``.

        ``keep``: this layer's own selection; ``prev_keep``: layer ``layer - 1``'s final one
        (None for layer 0); ``heads``: the KV heads these rows are (tensor parallelism: a
        rank's block). A sharing row takes the row below's selection, and its kept distant
        tokens (``sink_size <= position < T - window``) are stored as values only.
        """
        share = self.sharing[layer, heads].to(keep.device)
        values_only = torch.zeros_like(keep)
        if prev_keep is None or not bool(share.any()):
            return keep, values_only
        H, T = keep.shape
        keep = torch.where(share[:, None], prev_keep.to(keep.device), keep)
        w = effective_window(self.window_size, budget, T)
        pos = torch.arange(T, device=keep.device)
        distant = (pos >= self.sink_size) & (pos < T - w)
        values_only = keep & distant[None, :] & share[:, None]
        return keep, values_only
