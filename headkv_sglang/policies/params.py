"""Settings declared once: a dataclass field carries its flag, request key, help and rule.

A policy's hyperparameter is a field of its dataclass whose default is :func:`hyper`::

    @dataclass(frozen=True, kw_only=True)
    class MyPolicy(KVPolicy):
        stride: int = hyper(3, "Keeps every stride-th token.", low=1, high=64)

From that one declaration the server makes the flag ``--kv-stride`` (its ``--help`` text,
default and argparse type), the per-request key ``kv_stride`` (``custom_params``), the
attribute ``KVPolicyConfig.stride`` with its validation message
(``--kv-stride: invalid value 0; expected an integer in [1, 64]``), and
:meth:`KVPolicy.from_config <headkv_sglang.policies.base.KVPolicy.from_config>` passes
``cfg.stride`` to the field. ``name=`` gives the setting another name than the field
(PyramidKV's ``beta`` is ``--kv-pyramid-beta``); policies that declare the same name
must declare the same setting (StreamingLLM's and RazorAttention's ``sink_size``).
``KVPolicyConfig``'s own fields (budget, window, ...) are declared the same way.

A setting that ``from_config`` consumes but the policy object does not keep (RazorAttention's
``razor_fraction`` picks its ``retrieval_heads``) is a class attribute holding a
:class:`Param` (``ClassVar[Param]``), built with :func:`param`.

Torch-free and config-free: ``config.py`` imports this module, never the reverse.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

#: Key of a :class:`Param` in a dataclass field's metadata.
PARAM_KEY = "headkv_sglang.param"
#: Largest integer setting by default (the budget's bound).
MAX_INT = 1 << 20

_TYPES = (bool, int, float, str)


class _AsDefault:
    def __repr__(self) -> str:
        return "AS_DEFAULT"


#: ``Param.flag_default`` when the flag's default is the setting's.
AS_DEFAULT: Any = _AsDefault()


class ConfigError(ValueError):
    """An invalid setting; the message names the flag (or request key), the value and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One setting as the server exposes it.

    Attributes
    ----------
    name : str
        ``KVPolicyConfig`` attribute; the flag is ``--kv-<name with dashes>``, the request
        key ``kv_<name>``.
    default : Any
        Default value (the field's default).
    type : type
        ``int``, ``float``, ``str`` or ``bool`` (from the default when not given).
    help : str
        ``--help`` text (plain ``%``).
    low, high : float | None
        Inclusive range of an ``int`` / ``float`` (``int``: ``high`` defaults to
        :data:`MAX_INT`); ``low_open``: ``low`` excluded.
    choices : tuple[str, ...] | Callable[[], Sequence[str]] | None
        Allowed values of a ``str`` (a callable is asked each time: the policy names).
    odd : bool
        An ``int`` that must be odd.
    request : bool
        Settable per request as ``kv_<name>`` (False: server-only).
    check : Callable[[Any], str | None] | None
        Further rule: returns what is allowed when the value breaks it.
    parse : Callable[[Any, str], dict[str, Any]] | None
        Turns a flag or request value into the config fields it sets, raising
        :class:`ConfigError` naming its second argument (the budget: tokens or a share).
    flag_type : Callable[[str], Any] | None
        argparse ``type`` when not ``type`` (the budget: ``"128"`` or ``"5%"``).
    flag_default : Any
        argparse default when not ``default`` (``--kv-policy``: None, plain SGLang).
    """

    name: str
    default: Any
    type: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    odd: bool = False
    request: bool = True
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[Any, str], dict[str, Any]] | None = None
    flag_type: Callable[[str], Any] | None = None
    flag_default: Any = AS_DEFAULT

    def __post_init__(self) -> None:
        assert self.name.isidentifier() and self.name == self.name.lower(), f"setting name {self.name!r}"
        assert self.type in _TYPES, f"{self.name}: type {self.type!r} is not one of {_TYPES}"
        assert self.help.strip(), f"{self.name}: a setting needs its help text"
        if self.type is int and self.high is None:
            object.__setattr__(self, "high", MAX_INT)
        if self.type in (int, float):
            assert self.low is not None, f"{self.name}: a number setting needs low="

    # ------------------------------------------------------------------ names
    @property
    def flag(self) -> str:
        return "--kv-" + self.name.replace("_", "-")

    @property
    def key(self) -> str | None:
        """The ``custom_params`` key, or None for a server-only setting."""
        return f"kv_{self.name}" if self.request else None

    def allowed_choices(self) -> tuple[str, ...]:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c or ())

    # ------------------------------------------------------------------ rules
    def problem(self, value: Any) -> str | None:
        """What is allowed, when ``value`` is not (None when it is)."""
        if self.type is bool:
            return None if isinstance(value, bool) else "expected true or false"
        if self.type is int:
            lo, hi = int(self.low), int(self.high)  # type: ignore[arg-type]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                return f"expected an integer in [{lo}, {hi}]"
            if self.odd and value % 2 == 0:
                return "expected an odd integer"
        elif self.type is float:
            lo, hi = float(self.low), float(self.high if self.high is not None else math.inf)  # type: ignore[arg-type]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if self.low_open else value >= lo) and value <= hi
            if not ok:
                return f"expected a number in {'(' if self.low_open else '['}{lo}, {hi}]"
        elif self.choices is not None:
            allowed = self.allowed_choices()
            if value not in allowed:
                return f"choose one of {', '.join(allowed)}"
        if self.check is not None:
            return self.check(value)
        return None

    def coerce(self, value: Any) -> Any:
        """A JSON value as this setting's type where that is lossless (``2`` for a float,
        ``64.0`` for an int); anything else unchanged, for :meth:`problem` to refuse."""
        if isinstance(value, bool):
            return value
        if self.type is float and isinstance(value, int):
            return float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    # ------------------------------------------------------------------ argparse
    def argparse_kwargs(self) -> dict[str, Any]:
        help_text = self.help.replace("%", "%%")
        if self.type is bool:
            return dict(action="store_true", help=help_text)
        kw: dict[str, Any] = dict(type=self.flag_type or self.type, help=help_text,
                                  default=self.default if self.flag_default is AS_DEFAULT else self.flag_default)
        if self.choices is not None:
            kw["choices"] = self.allowed_choices()
        return kw


def hyper(default: Any, help: str, *, name: str | None = None, type: type | None = None, **rules: Any) -> Any:
    """A dataclass field declaring a setting (see the module docstring).

    ``rules``: :class:`Param`'s ``low``, ``high``, ``low_open``, ``choices``, ``odd``,
    ``request``, ``check``, ``parse``, ``flag_type``, ``flag_default``. The name defaults to
    the field's; the type to the default's.
    """
    spec = dict(name=name, type=type, help=help, rules=rules)
    return dataclasses.field(default=default, metadata={PARAM_KEY: spec})


def param(name: str, default: Any, help: str, *, type: type | None = None, **rules: Any) -> Param:
    """A setting that is not a field (``ClassVar[Param]``): ``from_config`` reads it from the config."""
    return Param(name=name, default=default, type=type or _type_of(default), help=help, **rules)


def _type_of(default: Any) -> type:
    for t in _TYPES:  # bool before int
        if isinstance(default, t):
            return t
    raise AssertionError(f"a setting's default must be one of {_TYPES}, got {default!r}; pass type=")


def field_param(f: dataclasses.Field) -> Param | None:
    """The :class:`Param` a field declares, or None for a plain field."""
    spec = f.metadata.get(PARAM_KEY)
    if spec is None:
        return None
    return Param(name=spec["name"] or f.name, default=f.default, type=spec["type"] or _type_of(f.default),
                 help=spec["help"], **spec["rules"])


def params_of(cls: type) -> Iterator[tuple[str | None, Param]]:
    """``(field name or None, Param)`` of every setting ``cls`` declares: its fields first
    (in field order), then its ``ClassVar[Param]`` attributes (field name None)."""
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            p = field_param(f)
            if p is not None:
                yield f.name, p
    seen: set[str] = set()
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            if isinstance(value, Param) and attr not in seen:
                seen.add(attr)
                yield None, value
