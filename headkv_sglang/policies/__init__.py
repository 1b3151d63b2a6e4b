"""KV-compression policies: one frozen dataclass per paper, looked up by name.

>>> from headkv_sglang.policies import get_policy
>>> get_policy("snapkv", window_size=16)
SnapKV(window_size=16, kernel_size=7, pooling='maxpool', gqa_agg='mean')

Pure torch: nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headkv_sglang.policies.adakv import AdaKV
from headkv_sglang.policies.base import CompressedLayer, KVPolicy, compress_layer, select_tokens
from headkv_sglang.policies.full import FullKV
from headkv_sglang.policies.headkv import HeadKV
from headkv_sglang.policies.pyramidkv import PyramidKV
from headkv_sglang.policies.razor import RazorAttention
from headkv_sglang.policies.snapkv import SnapKV
from headkv_sglang.policies.streamingllm import StreamingLLM

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (HeadKV, SnapKV, PyramidKV, AdaKV, StreamingLLM, RazorAttention, FullKV)
}


def policy_names() -> list[str]:
    """The registered policy names, sorted."""
    return sorted(POLICIES)


def get_policy(name: str, **hyperparams: Any) -> KVPolicy:
    """Instantiate the policy registered as ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        For an unknown name, an unknown or missing hyperparameter (the message
        lists the allowed ones), or an invalid value.
    """
    cls = POLICIES.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {policy_names()}")
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


__all__ = [
    "POLICIES",
    "AdaKV",
    "CompressedLayer",
    "FullKV",
    "HeadKV",
    "KVPolicy",
    "PyramidKV",
    "RazorAttention",
    "SnapKV",
    "StreamingLLM",
    "compress_layer",
    "get_policy",
    "policy_names",
    "select_tokens",
]
