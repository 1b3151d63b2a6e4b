"""PoD: proximal tokens attended in full, distant tokens' keys (or scores) shared within layer groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies import defaults
from headkv_sglang.policies.budgets import effective_window, uniform_pages
from headkv_sglang.policies.checks import check_choice, check_float, check_int, check_model_shape, check_request
from headkv_sglang.policies.observation import SinkObservationPolicy
from headkv_sglang.policies.params import hyper

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


def sharing_map(similarity: torch.Tensor, share: float, group: int = 2, threshold: float = 0.0) -> torch.Tensor:
    """bool ``[L, H]``: the (layer, KV head) rows that share their distant tokens' keys (or
    scores) with the rows below them in their layer group.

    ``round(share * L * H)`` rows of layers >= 1 are chosen, the most similar to the layer
    below first (``similarity[l, h]``: how alike the distant attention of layer ``l`` and
    ``l - 1`` is on head ``h``; ties to the lower layer, then head). A head's consecutive
    sharing rows ``s .. e`` and the row ``s - 1`` below them (which stores the distant keys
    they read) form a *group*; a row is taken only if its group stays at most ``group``
    layers (``group = 2``: pairs, no two adjacent sharing rows). Fewer are taken when no
    more fit (at most ``(group - 1)`` of every ``group`` layers above layer 0, per head).
    ``threshold > 0`` takes, instead of a share, every row whose similarity is at least
    ``threshold`` that fits (the paper's bottom-up blocks of alike consecutive layers, its
    ``delta``, when ``group`` does not bound them).
    """
    L, H = similarity.shape
    if group < 2:
        raise ValueError(f"a PoD group has at least 2 layers, got {group}")
    sim = similarity.to(torch.float64)
    order = sorted(((-float(sim[l, h]), l, h) for l in range(1, L) for h in range(H)
                    if threshold <= 0 or float(sim[l, h]) >= threshold))
    target = len(order) if threshold > 0 else round(share * L * H)
    taken = torch.zeros(L, H, dtype=torch.bool)
    if target <= 0 or L < 2:
        return taken
    n = 0
    for _, l, h in order:
        below = above = 0
        while l - below - 1 >= 1 and taken[l - below - 1, h]:
            below += 1
        while l + above + 1 < L and taken[l + above + 1, h]:
            above += 1
        if below + 1 + above > group - 1:  # the group would have more than ``group`` layers
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
    ``pod`` profile's similarities, ``share`` and ``group``) keeps the same tokens as row
    ``(l - 1, h)`` and stores only the **values** of its distant tokens (values-only pages
    hold two pages' worth of tokens). Its group's first layer ``s`` (the row below its
    consecutive sharing rows) stores their keys. At attention time the distant logits are,
    with ``sharing="keys"`` (the released PoD), the row's own queries against layer ``s``'s
    keys; with ``sharing="scores"`` (the paper's first version), layer ``s``'s logits (its
    queries against its keys), head by head of the GQA group. Either way they are joined with
    the row's own proximal and decoded tokens in one softmax over layer ``l``'s values.

    Differences from the paper: the rows are picked by the ``pod`` profile's similarity to the
    layer below (``python -m headkv_sglang.profile --method pod``), by ``share`` in groups of
    up to ``group`` layers or, like the paper's head-wise blocks, by ``threshold`` (its 0.5
    with an unbounded ``group``), not by its Jensen-Shannon measure; and no continued
    pre-training (the paper's "PoD w/o CPT" setting).

    Parameters
    ----------
    similarity : torch.Tensor
        float ``[num_layers, num_kv_heads]`` in ``[0, 1]`` (layer 0: unused).
    share : float
        Target share of all rows that share, in ``[0, 0.95]``.
    group : int
        Most layers in one sharing group (2: pairs).
    threshold : float
        When > 0, every row at least this similar shares (as many as ``group`` allows), not
        ``share`` of them.
    sharing : str
        ``"keys"`` or ``"scores"``: what a sharing row takes from its group's first layer.
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
    share: float = hyper(defaults.POD_SHARE, "PoD: share of the (layer, KV head) rows, in [0, 0.95], that take "
                         "their distant tokens' keys or scores (--kv-pod-sharing) from their layer group's first "
                         "layer and store no distant keys (the rows most similar to the layer below by the 'pod' "
                         "profile; fewer when the groups are full).", name="pod_share",
                         low=0.0, high=0.95)
    group: int = hyper(defaults.POD_GROUP, "PoD: most layers in one sharing group of a KV head (the first stores "
                       "the distant keys; 2: pairs).", name="pod_group", low=2, high=1024)
    threshold: float = hyper(defaults.POD_THRESHOLD, "PoD: when > 0, the rows whose similarity to the layer below "
                             "is at least this share (as many as --kv-pod-group allows) instead of --kv-pod-share "
                             "(the paper's blocks: 0.5 with a large --kv-pod-group).", name="pod_threshold",
                             low=0.0, high=1.0)
    sharing: str = hyper(defaults.POD_SHARING, "PoD: what a sharing row takes from its group's first layer for its "
                         "distant tokens: 'keys' (its own queries against them, the released PoD) or 'scores' "
                         "(that layer's logits, the paper's first version).", name="pod_sharing",
                         choices=defaults.POD_SHARINGS)

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
        check_float(cls, "share", self.share, low=0.0, high=0.95)
        check_int(cls, "group", self.group, 2)
        check_choice(cls, "sharing", self.sharing, defaults.POD_SHARINGS)
        check_float(cls, "threshold", self.threshold, low=0.0, high=1.0)
        object.__setattr__(self, "_sharing", sharing_map(table, self.share, self.group, self.threshold))

    @property
    def sharing_rows(self) -> torch.Tensor:
        """bool ``[num_layers, num_kv_heads]``: :func:`sharing_map` of this policy."""
        return self._sharing  # type: ignore[attr-defined]

    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> PoD:
        """Similarity: the ``pod`` profile's per-KV-head similarity to the layer below."""
        assert profile is not None, "PoD needs its 'pod' profile (registry.resolve_profile)"
        return cls(similarity=torch.as_tensor(profile.kv_scores, dtype=torch.float64), share=cfg.pod_share,
                   group=cfg.pod_group, threshold=cfg.pod_threshold, sharing=cfg.pod_sharing,
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
        return uniform_pages(rows, min(seq_len, budget), page_size) + int(self.sharing_rows.sum())

    def link_layer(self, layer: int, keep: torch.Tensor, prev_keep: torch.Tensor | None, budget: int,
                   heads: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, values_only)`` of ``layer``, both bool ``[H, T]``.

        ``keep``: this layer's own selection; ``prev_keep``: layer ``layer - 1``'s final one
        (None for layer 0); ``heads``: the KV heads these rows are (tensor parallelism: a
        rank's block). A sharing row takes the row below's selection (so every row of a group
        keeps its first layer's), and its kept distant tokens (``sink_size <= position < T -
        window``) are stored as values only.
        """
        share = self.sharing_rows[layer, heads].to(keep.device)
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
