"""The KV-compression policy interface and the pieces every policy shares.

A policy decides, at the end of a request's prefill and for every
(layer, KV head), which prompt tokens stay in the cache. The serving backend
calls, layer by layer::

    planned = policy.plan_budgets(T, B, L, H)          # once per request
    scores  = policy.token_scores(q_win, k, layer)      # [H, T]
    budgets = policy.layer_budgets(layer, T, B, scores, planned)
    keep    = policy.select_mask(scores, budgets)       # bool [H, T]

or simply :func:`compress_layer`, which does all three and gathers the kept
keys and values into a ragged (CSR) layout. Every step is batched over heads
(no Python loop over heads), so compression on a GPU is a few kernels per layer;
``policy.select`` gives the same choice as one index tensor per head.

Budget semantics
----------------
``budget`` ``B`` is the number of prompt tokens kept per **KV head**, on
average over all ``L * H_kv`` heads of the model, **including** the
observation window (the last ``window_size`` prompt tokens, always kept) and
attention sinks. Budgets are GQA-native: a KV head's token scores aggregate the
query heads of its group, and one budget unit is one (key, value) pair of one
KV head. (HeadKV's published budgets count query heads after ``repeat_kv``;
with 4 query heads per KV head those are 4x the memory of ours.)

* Score-based planners (:class:`~headkv_sglang.policies.SnapKV`, PyramidKV,
  HeadKV, AdaKV, StreamingLLM) never keep more than ``L * H * B`` tokens in
  total. No head keeps more than ``T`` (the prompt length); the budget a
  clamped head cannot use is redistributed to the heads still below ``T``, so
  the total is ``min(L * H * B, L * H * T)``.
* :class:`~headkv_sglang.policies.RazorAttention` keeps every token on its
  retrieval heads, so its total is **not** bounded by ``L * H * B``; its
  compensation token (one merged state per compressed head) is not counted
  in ``B`` either.
* :class:`~headkv_sglang.policies.FullKV` keeps all ``T`` tokens.
* When ``B`` is smaller than the window, a head keeps only its last ``B``
  tokens.

Shared selection
----------------
For a head with budget ``b`` and prompt length ``T``: ``b >= T`` keeps
everything; otherwise the last ``min(w, b)`` tokens (the window) plus the
``b - min(w, b)`` highest-scored positions of ``[0, T - w)``, ties broken
towards the lower position so that selection is deterministic
(:func:`~headkv_sglang.policies.scoring.select_mask`).

What the server needs to know about a policy
--------------------------------------------
Each class carries it, so that adding a policy is one file plus one line in
``registry.py``: ``name``, ``needs_queries``, ``compresses``,
``profile_method`` (class attributes), its hyperparameters (fields declared
with :func:`~headkv_sglang.policies.params.hyper`: each becomes a ``--kv-*``
flag, a ``kv_*`` request key and a ``KVPolicyConfig`` attribute),
:meth:`KVPolicy.from_config` (built from the server/request config; by
default from those fields), :meth:`KVPolicy.check_config` (its cross-field
rules on that config) and :meth:`KVPolicy.max_pages` (its worst-case pages,
for admission).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from headkv_sglang.policies.budgets import uniform_pages
from headkv_sglang.policies import defaults
from headkv_sglang.policies.checks import BadValue, check_request
from headkv_sglang.policies.params import field_param, hyper
from headkv_sglang.policies.scoring import select_mask, select_tokens

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape


def sink_size_field() -> Any:
    """The ``sink_size`` hyperparameter, one declaration for every policy that keeps sinks."""
    return hyper(defaults.SINK_SIZE, "Attention-sink tokens kept (the first prompt tokens).", low=0, high=4096)


# --------------------------------------------------------------------------- #
# The interface
# --------------------------------------------------------------------------- #
class KVPolicy(ABC):
    """Which prompt tokens each (layer, KV head) keeps after prefill.

    Subclasses are small frozen dataclasses named after their paper whose
    fields are the paper's hyperparameters. See the module docstring for the
    budget semantics.
    """

    name: ClassVar[str]
    #: True only for RazorAttention: the dropped tokens of a head are merged
    #: into one extra (key, value) state whose logit gets ``+log(count)``.
    uses_compensation: ClassVar[bool] = False
    #: False when the scores ignore the queries (position-based policies): the
    #: backend may then skip capturing ``q_win`` and pass an empty tensor.
    needs_queries: ClassVar[bool] = True
    #: False only for FullKV: the server then leaves the request in SGLang's own pool.
    compresses: ClassVar[bool] = True
    #: The head-profile method the policy is built from (``profiles.METHODS``), or
    #: None when it needs no profile.
    profile_method: ClassVar[str | None] = None
    #: True when the kept keys/values are changed by what was dropped (D2O merges each
    #: dropped token into a similar kept one): :func:`compress_layer` then calls
    #: :meth:`merge_dropped`.
    merges_dropped: ClassVar[bool] = False
    #: True when a layer's rows depend on the layer below's (PoD: a sharing row keeps the
    #: row below's tokens and stores its distant ones as values only): :func:`compress_layer`
    #: then calls :meth:`link_layer` with the previous layer's result.
    links_layers: ClassVar[bool] = False
    #: Pages a row may take beyond ``ceil(kept / page_size)`` (PoD's values-only pages: 1).
    row_pages_slack: ClassVar[int] = 0

    window_size: int

    def __post_init__(self) -> None:
        """Every declared hyperparameter within its declared rule (a subclass with its own
        ``__post_init__`` checks its fields itself)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            p = field_param(f)
            allowed = None if p is None else p.problem(getattr(self, f.name))
            if allowed is not None:
                raise ValueError(f"{type(self).__name__}.{f.name}: {allowed}, got {getattr(self, f.name)!r}")

    # ------------------------------------------------------------------ server hooks
    @classmethod
    def from_config(cls, cfg: KVPolicyConfig, shape: ModelShape, profile: Any) -> KVPolicy:
        """The policy a (validated) server or request config asks for.

        Default: ``cls(**cls.config_kwargs(cfg))``. A policy built from a profile (or
        anything else than its declared fields) overrides it.

        Parameters
        ----------
        cfg : KVPolicyConfig
            Its ``policy`` names this class.
        shape : ModelShape
            The served model.
        profile : headkv_sglang.profiles.HeadProfile | None
            The head profile loaded for :attr:`profile_method` (None when that is None).
        """
        return cls(**cls.config_kwargs(cfg))

    @classmethod
    def config_kwargs(cls, cfg: KVPolicyConfig) -> dict[str, Any]:
        """The fields the config sets: each declared hyperparameter from its setting
        (``cfg.<name>``), ``window_size`` from ``cfg.obs_window`` and ``agnostic_kernel_size`` from
        ``cfg.agnostic_kernel``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            p = field_param(f)
            if p is not None:
                out[f.name] = getattr(cfg, p.name)
            elif f.name == "window_size" and f.init:
                out[f.name] = cfg.obs_window
            elif f.name == "agnostic_kernel_size" and f.init:
                out[f.name] = cfg.agnostic_kernel
        return out

    @classmethod
    def check_config(cls, cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
        """Raise ``bad(field, value, allowed)`` if ``cfg`` breaks a rule between its fields.

        Called by ``KVPolicyConfig.validate`` after every field was checked alone.
        ``changed``: the fields a request overrode; of two conflicting fields, blame
        the overridden one. Default: no rule.
        """

    @classmethod
    def min_budget(cls, cfg: KVPolicyConfig) -> int:
        """The smallest budget this policy can serve ``cfg`` with: a ratio budget
        (``--kv-budget 5%``) is raised to it on short prompts. Default: the explicit
        window (the tokens always kept), at least 1."""
        return max(1, cfg.window)

    def max_pages(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int, page_size: int
    ) -> int:
        """Pages a prompt of ``seq_len`` tokens may need at most once compressed.

        Admission reserves this many pages before prefill, so it must never be
        below what :func:`compress_layer` keeps over all layers, each (layer, KV
        head) row padded to whole pages of ``page_size`` tokens. Default: every
        head keeps the whole prompt (safe for any policy; override it with the
        policy's own bound).
        """
        return uniform_pages(num_layers * num_kv_heads, seq_len, page_size)

    # ------------------------------------------------------------------ per request

    def check_model(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ValueError if this policy cannot serve a model of this shape.

        Call it at server start: policies carrying a per-head profile check
        that it was measured on a model with the same layers and KV heads.
        """
        check_request(1, 1, num_layers, num_kv_heads)

    @abstractmethod
    def plan_budgets(
        self, seq_len: int, budget: int, num_layers: int, num_kv_heads: int
    ) -> torch.Tensor | None:
        """Per-head budgets known before scoring.

        Returns
        -------
        torch.Tensor | None
            int64 ``[num_layers, num_kv_heads]`` on the CPU, each in
            ``[0, seq_len]``; ``None`` when budgets depend on the scores
            (AdaKV), in which case :meth:`layer_budgets` computes them.
        """

    @abstractmethod
    def token_scores(self, q_win: torch.Tensor, k: torch.Tensor, layer: int,
                     q_end: int | None = None) -> torch.Tensor:
        """Importance of every prompt token for every KV head of ``layer``.

        Parameters
        ----------
        q_win : torch.Tensor
            ``[num_q_heads, n, head_dim]``, scoring queries after RoPE (may be
            empty when ``needs_queries`` is False): without ``q_end`` the last
            ``n = min(window_size, T)`` prompt queries.
        k : torch.Tensor
            ``[num_kv_heads, T, head_dim]``, the prompt keys after RoPE.
        layer : int
            Layer index.
        q_end : int | None
            The queries sit at positions ``[q_end - n, q_end)`` (question-aware
            scoring); only passed when not None, so a policy that ignores the
            queries may leave it out of its signature.

        Returns
        -------
        torch.Tensor
            float32 ``[num_kv_heads, T]`` on ``k.device``; ``+inf`` on the
            observation window (the last ``min(window_size, T)`` tokens).
        """

    def scores_from_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """Scores from question-agnostic attention masses ``[num_kv_heads, group, T]`` (the
        ``self`` / ``reconstruct`` scorings); only the policies that rank tokens by attention
        (the observation-window ones) have them."""
        raise NotImplementedError(f"{type(self).__name__} does not rank tokens by attention mass")

    def layer_budgets(
        self,
        layer: int,
        seq_len: int,
        budget: int,
        scores: torch.Tensor,
        planned: torch.Tensor | None,
    ) -> torch.Tensor:
        """int64 ``[num_kv_heads]`` budgets of ``layer`` (default: ``planned[layer]``).

        ``scores`` is float32 ``[num_kv_heads, T]`` from :meth:`token_scores`.
        """
        assert planned is not None, (
            f"{type(self).__name__} plans its budgets up front; pass plan_budgets()'s result"
        )
        assert 0 <= layer < planned.shape[0], f"layer {layer} outside planned {list(planned.shape)}"
        return planned[layer]

    def select(self, scores: torch.Tensor, budgets: torch.Tensor) -> list[torch.Tensor]:
        """Per KV head, sorted int64 indices of the kept prompt tokens.

        ``scores``: float32 ``[num_kv_heads, T]``; ``budgets``: int64
        ``[num_kv_heads]``. ``len(result[h]) == min(budgets[h], T)``.
        """
        return select_tokens(scores, budgets, self.window_size)

    def select_mask(self, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """:meth:`select` as a bool ``[num_kv_heads, T]`` keep mask (what :func:`compress_layer`
        uses: batched over heads). A policy with its own selection overrides this."""
        return select_mask(scores, budgets, self.window_size)

    def merge_dropped(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      kept: CompressedLayer, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """New ``kept.k_flat, kept.v_flat`` (``[N, head_dim]``) that take in the dropped tokens.

        Called by :func:`compress_layer` when :attr:`merges_dropped` is True, with the
        layer's ``k, v`` (``[num_kv_heads, T, head_dim]``, read-only) and the bool keep
        mask ``[num_kv_heads, T]``; must not change which tokens are kept. ``gather``
        (tensor parallelism, ``policies.sharding``): ``[H, T] -> [H_all, T]`` over the
        ranks, for a merge that uses a statistic of the whole layer.
        """
        raise NotImplementedError(f"{type(self).__name__} sets merges_dropped but has no merge_dropped")

    def link_layer(self, layer: int, keep: torch.Tensor, prev_keep: torch.Tensor | None, budget: int,
                   heads: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, values_only)`` bool ``[num_kv_heads, T]`` of ``layer`` given its own
        selection ``keep`` and the previous layer's final one (None for layer 0).

        Called by :func:`compress_layer` when :attr:`links_layers` is True. ``values_only``
        marks kept tokens whose keys are not stored: their logits are the previous layer's
        (same KV head) and they must be kept there too. ``heads``: which of the model's KV
        heads the rows are (a tensor-parallel rank's block).
        """
        raise NotImplementedError(f"{type(self).__name__} sets links_layers but has no link_layer")


# --------------------------------------------------------------------------- #
# Compression of one layer
# --------------------------------------------------------------------------- #
@dataclass
class CompressedLayer:
    """The kept prompt KV of one layer, one CSR row per KV head.

    Attributes
    ----------
    k_flat, v_flat : torch.Tensor
        ``[N, head_dim]`` (dtype of the input K/V): rows
        ``indptr[h]:indptr[h+1]`` hold head ``h``'s kept tokens, in position
        order.
    indptr : torch.Tensor
        int64 ``[num_kv_heads + 1]``, ``indptr[0] == 0``, ``indptr[-1] == N``.
    indices : torch.Tensor
        int64 ``[N]``: the prompt positions of the kept tokens.
    comp_k, comp_v : torch.Tensor | None
        ``[num_kv_heads, head_dim]`` (input dtype): mean key / value of each
        head's dropped tokens (zeros where nothing was dropped); None unless
        the policy uses compensation.
    comp_count : torch.Tensor | None
        int64 ``[num_kv_heads]``: number of dropped tokens (0: no comp state).
    keep : torch.Tensor | None
        bool ``[num_kv_heads, T]``: the kept tokens as a mask.
    values_only : torch.Tensor | None
        bool ``[N]``: kept tokens whose key is not stored (PoD's sharing rows; their
        logits are the previous layer's), or None when every key is stored.
    """

    k_flat: torch.Tensor
    v_flat: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    comp_k: torch.Tensor | None = None
    comp_v: torch.Tensor | None = None
    comp_count: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    values_only: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.indptr.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[num_kv_heads]`` kept tokens per head."""
        return self.indptr[1:] - self.indptr[:-1]


def compress_layer(
    policy: KVPolicy,
    layer: int,
    q_win: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int,
    planned: torch.Tensor | None,
    q_end: int | None = None,
    prev: CompressedLayer | None = None,
    mass: torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
) -> CompressedLayer:
    """Score, budget, select and gather one layer's prompt KV.

    Parameters
    ----------
    policy : KVPolicy
    layer : int
    q_win : torch.Tensor
        ``[num_q_heads, n, head_dim]``: the scoring queries (post-RoPE), by default
        the last ``min(window_size, T)`` prompt queries.
    k, v : torch.Tensor
        ``[num_kv_heads, T, head_dim]``: the layer's prompt keys / values.
    budget : int
        ``B``, see the module docstring.
    planned : torch.Tensor | None
        ``policy.plan_budgets(T, B, L, H)`` (int64 ``[L, H]``) or None.
    q_end : int | None
        Position after the last scoring query (question-aware scoring), see
        :meth:`KVPolicy.token_scores`.
    prev : CompressedLayer | None
        Layer ``layer - 1``'s result, for a policy that :attr:`~KVPolicy.links_layers`.
    mass : torch.Tensor | None
        Question-agnostic scoring: ``[num_kv_heads, group, T]`` attention masses
        (:meth:`KVPolicy.scores_from_mass`) rank the tokens instead of ``q_win``.
    budgets : torch.Tensor | None
        int64 ``[num_kv_heads]``: this layer's budgets decided elsewhere (a global selection,
        :func:`~headkv_sglang.policies.budgets.global_budgets`) instead of
        :meth:`KVPolicy.layer_budgets`.

    Returns
    -------
    CompressedLayer
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"k and v must both be [num_kv_heads, T, head_dim], got {list(k.shape)} and {list(v.shape)}"
        )
    num_heads, seq_len, _ = k.shape
    if mass is not None and getattr(policy, "needs_queries", True):
        if mass.shape[0] != num_heads or mass.shape[2] != seq_len:
            raise ValueError(f"mass must be [{num_heads}, group, {seq_len}], got {list(mass.shape)}")
        scores = policy.scores_from_mass(mass)
    else:
        scores = (policy.token_scores(q_win, k, layer) if q_end is None
                  else policy.token_scores(q_win, k, layer, q_end=q_end))
    if budgets is None:
        budgets = policy.layer_budgets(layer, seq_len, budget, scores, planned)
    keep = policy.select_mask(scores, budgets)
    if keep.shape != (num_heads, seq_len):
        raise ValueError(f"select_mask returned {list(keep.shape)}, expected [{num_heads}, {seq_len}]")
    values_only = None
    if policy.links_layers:
        if layer > 0 and (prev is None or prev.keep is None):
            raise ValueError(f"{type(policy).__name__} links layers: layer {layer} needs layer {layer - 1}'s result")
        keep, vo = policy.link_layer(layer, keep, None if layer == 0 else prev.keep, budget)
        if keep.shape != (num_heads, seq_len) or vo.shape != keep.shape or bool((vo & ~keep).any()):
            raise ValueError(f"{type(policy).__name__}.link_layer returned a bad keep / values-only pair")
        values_only = vo
    head_of, indices = keep.nonzero(as_tuple=True)  # head by head, positions ascending
    lengths = keep.sum(dim=1)
    indptr = torch.zeros(num_heads + 1, dtype=torch.int64, device=k.device)
    torch.cumsum(lengths, dim=0, out=indptr[1:])
    out = CompressedLayer(
        k_flat=k[head_of, indices], v_flat=v[head_of, indices], indptr=indptr, indices=indices, keep=keep,
        values_only=None if values_only is None or not bool(values_only.any()) else values_only[head_of, indices],
    )
    if policy.merges_dropped:
        k_flat, v_flat = policy.merge_dropped(k, v, keep, out)
        if k_flat.shape != out.k_flat.shape or v_flat.shape != out.v_flat.shape:
            raise ValueError(f"{type(policy).__name__}.merge_dropped changed the kept tokens' shape "
                             f"{list(out.k_flat.shape)} -> {list(k_flat.shape)}")
        out.k_flat, out.v_flat = k_flat, v_flat
    if policy.uses_compensation:
        dropped = (~keep.to(k.device)).to(torch.float32)
        count = dropped.sum(dim=1)
        denom = count.clamp(min=1.0)[:, None]
        out.comp_k = (torch.einsum("ht,htd->hd", dropped, k.to(torch.float32)) / denom).to(k.dtype)
        out.comp_v = (torch.einsum("ht,htd->hd", dropped, v.to(torch.float32)) / denom).to(v.dtype)
        out.comp_count = count.to(torch.int64)
    return out
