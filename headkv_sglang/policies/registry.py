"""The policy registry: name -> policy class, and building a policy from the server config.

Everything the server knows about a policy lives on its class (``needs_queries``,
``compresses``, ``profile_method``, ``from_config``, ``check_config``, ``max_pages``;
see :class:`~headkv_sglang.policies.base.KVPolicy`), its hyperparameters included (fields
declared with :func:`~headkv_sglang.policies.params.hyper`: :func:`policy_params` collects
them for the flags, request keys and ``KVPolicyConfig``), so adding one is a file in this
package plus a line in ``_BUILTIN`` below (or one :func:`register` call from outside).

Built-in classes are imported on first lookup: ``config.py`` lists the names (the
``--kv-policy`` choices) at import time without importing torch. This module never
imports ``config.py`` (which imports it).

>>> policy_class("snapkv").needs_queries, policy_class("full").compresses
(True, False)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from headkv_sglang.policies.params import ConfigError, Param, params_of

if TYPE_CHECKING:
    from headkv_sglang.config import KVPolicyConfig, ModelShape
    from headkv_sglang.policies.base import KVPolicy
    from headkv_sglang.profiles import HeadProfile

# name -> "module:Class", in the order the --kv-policy choices are listed.
_BUILTIN: tuple[tuple[str, str], ...] = (
    ("full", "headkv_sglang.policies.full:FullKV"),
    ("headkv", "headkv_sglang.policies.headkv:HeadKV"),
    ("snapkv", "headkv_sglang.policies.snapkv:SnapKV"),
    ("pyramidkv", "headkv_sglang.policies.pyramidkv:PyramidKV"),
    ("adakv", "headkv_sglang.policies.adakv:AdaKV"),
    ("streamingllm", "headkv_sglang.policies.streamingllm:StreamingLLM"),
    ("razor", "headkv_sglang.policies.razor:RazorAttention"),
    ("d2o", "headkv_sglang.policies.d2o:D2O"),
    ("pod", "headkv_sglang.policies.pod:PoD"),
)


class PolicyRegistry(Mapping[str, "type[KVPolicy]"]):
    """Policy classes by name, in registration order; ``"module:Class"`` entries load on first use."""

    def __init__(self, lazy: tuple[tuple[str, str], ...] = ()) -> None:
        self._entries: dict[str, type[KVPolicy] | str] = dict(lazy)

    def __getitem__(self, name: str) -> type[KVPolicy]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            assert entry.name == name, f"{entry.__name__}.name is {entry.name!r}, registered as {name!r}"
            self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:  # without importing the class
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, cls: type[KVPolicy]) -> None:
        from headkv_sglang.policies.base import KVPolicy

        if not (isinstance(cls, type) and issubclass(cls, KVPolicy)):
            raise TypeError(f"register() takes a KVPolicy subclass, got {cls!r}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{cls.__name__}.name must be a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"a policy named {name!r} is already registered ({self._entries[name]}); "
                f"unregister it first or pick another name"
            )
        self._entries[name] = cls

    def remove(self, name: str) -> type[KVPolicy]:
        cls = self[name]
        del self._entries[name]
        return cls


#: The registry; a read-only mapping for callers (use :func:`register` / :func:`unregister`).
POLICIES = PolicyRegistry(_BUILTIN)


def register(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Make ``cls`` available as ``--kv-policy cls.name`` (usable as a class decorator).

    Raises ValueError if the name is taken, TypeError if ``cls`` is not a KVPolicy.
    """
    POLICIES.add(cls)
    build_policy.cache_clear()
    policy_params.cache_clear()
    return cls


def unregister(name: str) -> type[KVPolicy]:
    """Remove the policy registered as ``name`` and return its class (KeyError if none)."""
    cls = POLICIES.remove(name)
    build_policy.cache_clear()
    policy_params.cache_clear()
    return cls


@contextmanager
def registered(cls: type[KVPolicy]) -> Iterator[type[KVPolicy]]:
    """Register ``cls`` for the duration of a ``with`` block (tests, experiments)."""
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.name)


def policy_names() -> list[str]:
    """The registered policy names, sorted."""
    return sorted(POLICIES)


def policy_class(name: str) -> type[KVPolicy]:
    """The class registered as ``name`` (exact). Raises ConfigError for an unknown name."""
    if name not in POLICIES:
        raise ConfigError(f"--kv-policy: unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


@lru_cache(maxsize=1)
def policy_params() -> dict[str, tuple[Param, tuple[str, ...]]]:
    """Every hyperparameter the registered policies declare: name -> (its Param, the names
    of the policies that use it), in registration and declaration order.

    Raises AssertionError when two policies declare one name differently (one name, one
    meaning: give one of them another ``name=``).
    """
    out: dict[str, tuple[Param, tuple[str, ...]]] = {}
    for policy, cls in POLICIES.items():
        for _, p in params_of(cls):
            if p.name in out:
                first, users = out[p.name]
                assert first == p, (f"policy {policy!r} declares setting {p.name!r} as {p}, but "
                                    f"{users[0]!r} as {first}; declare it the same way or name it apart")
                if policy not in users:
                    out[p.name] = (first, users + (policy,))
            else:
                out[p.name] = (p, (policy,))
    return out


def get_policy(name: str, **hyperparams: Any) -> KVPolicy:
    """Instantiate the policy registered as ``name`` (case-insensitive) from its fields.

    Raises
    ------
    ValueError
        For an unknown name, an unknown or missing hyperparameter (the message
        lists the allowed ones), or an invalid value.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {policy_names()}")
    cls = POLICIES[key]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(hyperparams) - set(fields))
    if unknown:
        raise ValueError(
            f"{cls.__name__} ({name!r}) has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"allowed: {sorted(fields)}"
        )
    missing = sorted(
        n
        for n, f in fields.items()
        if n not in hyperparams
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(
            f"{cls.__name__} ({name!r}) needs {', '.join(map(repr, missing))} "
            f"(a per-(layer, KV head) tensor; see {cls.__name__}'s docstring); "
            f"allowed: {sorted(fields)}"
        )
    return cls(**hyperparams)


# ---------------------------------------------------------------------- from the server config
def resolve_profile(cfg: KVPolicyConfig, shape: ModelShape) -> HeadProfile | None:
    """Load the head profile the policy needs (None for policies that need none).

    Raises ConfigError when no shipped profile matches the model or a given file does
    not match its shape.
    """
    method = policy_class(cfg.policy).profile_method
    if method is None:
        return None
    from headkv_sglang import profiles

    path = cfg.head_profile
    if path is None:
        found = profiles.shipped_profile(shape.hf_config, method)
        if found is None:
            # the shape's own numbers where its config.json is not at hand (a shape built by hand)
            model_config = {"architectures": [shape.architecture or "unknown architecture"], "num_hidden_layers": shape.num_layers,
                            "num_attention_heads": shape.num_q_heads, "num_key_value_heads": shape.num_kv_heads,
                            "head_dim": shape.head_dim, **(shape.hf_config or {})}
            raise ConfigError("--kv-head-profile: " + profiles.missing_profile_message(model_config, method))
        path = str(found)
    try:
        prof = profiles.cached_profile(path)  # parsed once per file: a ratio budget builds per prompt length
        prof.check_model(shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim)
    except ValueError as e:
        raise ConfigError(f"--kv-head-profile: {e}") from e
    return prof


@lru_cache(maxsize=64)
def build_policy(cfg: KVPolicyConfig, shape: ModelShape) -> KVPolicy:
    """The policy object for a (validated) config; cached because configs are frozen."""
    cls = policy_class(cfg.policy)
    return cls.from_config(cfg, shape, resolve_profile(cfg, shape))


def pages_upper_bound(cfg: KVPolicyConfig, shape: ModelShape, seq_len: int, page_size: int) -> int:
    """Pages a request of ``seq_len`` tokens may need at most (for admission). A question-agnostic
    scoring selected globally (``agnostic_select`` "global") spreads a ranking policy's total over
    rows of any length (``scoring`` "auto" may resolve to one)."""
    from headkv_sglang.policies.budgets import average_bound_pages  # torch: not at import (config.py imports this)

    policy = build_policy(cfg, shape)
    bound = policy.max_pages(seq_len, cfg.budget, shape.num_layers, shape.num_kv_heads, page_size)
    if (cfg.agnostic_select == "global" and cfg.scoring not in ("question", "window")
            and getattr(policy, "needs_queries", True)):
        bound = max(bound, average_bound_pages(seq_len, cfg.budget, shape.num_layers, shape.num_kv_heads, page_size))
    return bound
