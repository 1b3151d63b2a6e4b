"""Validation helpers: a policy's fields (``__post_init__``), a request's sizes, and
the cross-field rules a policy adds to the server config (``check_config``).

Errors name the class, the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Literal

import torch

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig

#: ``bad(field, value, allowed)``: the ``ConfigError`` that ``KVPolicyConfig.validate``
#: raises for ``field`` (it names the flag or request key of the field).
BadValue = Callable[[str, object, str], Exception]


def check_int(cls_name: str, field: str, value: object, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{cls_name}.{field} must be an int >= {minimum}, got {value!r}"
        )


def check_float(
    cls_name: str,
    field: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ValueError unless ``value`` is a real number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v) or v == high == math.inf
        ok = ok and (v >= low if low_inclusive else v > low)
        ok = ok and (v <= high if high_inclusive else v < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(
            f"{cls_name}.{field} must be a number in {lo}{low}, {high}{hi}, got {value!r}"
        )


def check_choice(cls_name: str, field: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{cls_name}.{field} must be one of {list(allowed)}, got {value!r}")


def check_head_table(
    cls_name: str, field: str, value: object, *, dtype_kind: Literal["float", "bool"]
) -> torch.Tensor:
    """Validate a per-(layer, KV head) table and return a private CPU copy.

    The copy keeps a frozen policy immune to the caller mutating its tensor.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{cls_name}.{field} must be a torch.Tensor of shape [num_layers, num_kv_heads], "
            f"got {type(value).__name__}"
        )
    if value.dim() != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise ValueError(
            f"{cls_name}.{field} must have shape [num_layers, num_kv_heads], "
            f"got {list(value.shape)}"
        )
    if dtype_kind == "bool":
        if value.dtype != torch.bool:
            raise ValueError(f"{cls_name}.{field} must be a bool tensor, got {value.dtype}")
        return value.detach().to("cpu").clone()
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{cls_name}.{field} must be a real tensor, got {value.dtype}")
    t = value.detach().to("cpu", torch.float64).clone()
    if not torch.isfinite(t).all() or (t < 0).any() or t.sum() <= 0:
        raise ValueError(
            f"{cls_name}.{field} must be finite, >= 0 and not all zero; "
            f"got min={t.min().item()}, max={t.max().item()}, sum={t.sum().item()}"
        )
    return t


def check_model_shape(
    cls_name: str, field: str, table: torch.Tensor, num_layers: int, num_kv_heads: int
) -> None:
    """A head profile must have been measured on a model of the same shape."""
    if tuple(table.shape) != (num_layers, num_kv_heads):
        raise ValueError(
            f"{cls_name}.{field} has shape {list(table.shape)} but the model has "
            f"[num_layers={num_layers}, num_kv_heads={num_kv_heads}]; use a profile "
            f"measured on this model (per KV head, query heads of a group aggregated)"
        )


def check_request(seq_len: int, budget: int, num_layers: int = 1, num_kv_heads: int = 1) -> None:
    """Validate the per-request arguments of the planners."""
    for name, value in (
        ("seq_len", seq_len),
        ("budget", budget),
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# --------------------------------------------------------------------------- #
# Cross-field rules of the server config (a policy's ``check_config``)
# --------------------------------------------------------------------------- #
def check_window_fits(cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str]) -> None:
    """The observation window (always kept) must fit in the budget; ``window=0`` (auto) fits.

    ``changed``: the fields a request overrode; the overridden one of budget and window
    is blamed, the window when both or neither were. A ratio budget is resolved per prompt
    to at least the window (``KVPolicyConfig.for_prompt``), so it always fits.
    """
    if cfg.budget_ratio or cfg.window <= cfg.budget:
        return
    if "budget" in changed and "window" not in changed:
        raise bad("budget", cfg.budget, f"must be at least the observation window ({cfg.window})")
    raise bad("window", cfg.window, f"the observation window must not exceed --kv-budget ({cfg.budget})")


def check_sinks_fit(cfg: KVPolicyConfig, bad: BadValue, changed: frozenset[str],
                    setting: str = "sink_size") -> None:
    """The attention sinks must leave room for recent tokens: ``sinks < budget``.

    ``setting``: the config attribute holding the policy's sinks (``sink_size``; D2O's is
    ``d2o_sink_size``). Blames the budget when only it was overridden, otherwise the sinks.
    A ratio budget is resolved per prompt to at least ``sinks + 1``.
    """
    sinks = getattr(cfg, setting)
    if cfg.budget_ratio or sinks < cfg.budget:
        return
    if "budget" in changed and setting not in changed:
        raise bad("budget", cfg.budget, f"must exceed the attention sinks ({sinks})")
    raise bad(setting, sinks, f"sinks must leave room for recent tokens: < --kv-budget ({cfg.budget})")
