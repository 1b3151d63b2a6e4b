"""KV-compression policies: one frozen dataclass per paper, looked up by name.

>>> from headkv_sglang.policies import get_policy
>>> get_policy("snapkv", window_size=16)
SnapKV(window_size=16, kernel_size=13, pooling='maxpool', pool_shift=0, gqa_agg='mean')

Layout: ``base.py`` the :class:`KVPolicy` interface and :func:`compress_layer`;
``observation.py`` the SnapKV-scored base; one file per policy; ``scoring.py``,
``budgets.py``, ``checks.py`` the shared pieces; ``defaults.py`` every
hyperparameter's default; ``registry.py`` name -> class and building from the
server config.

Pure torch: nothing here imports SGLang. The names below load on first use, so
that ``config.py`` can read ``defaults`` and the registry's names without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headkv_sglang.policies.adakv import AdaKV
    from headkv_sglang.policies.base import CompressedLayer, KVPolicy, compress_layer
    from headkv_sglang.policies.d2o import D2O
    from headkv_sglang.policies.full import FullKV
    from headkv_sglang.policies.headkv import HeadKV
    from headkv_sglang.policies.pyramidkv import PyramidKV
    from headkv_sglang.policies.razor import RazorAttention
    from headkv_sglang.policies.registry import (
        POLICIES,
        get_policy,
        policy_class,
        policy_names,
        register,
        unregister,
    )
    from headkv_sglang.policies.scoring import select_tokens
    from headkv_sglang.policies.snapkv import SnapKV
    from headkv_sglang.policies.streamingllm import StreamingLLM

# public name -> submodule defining it
_EXPORTS = {
    "AdaKV": "adakv",
    "CompressedLayer": "base",
    "D2O": "d2o",
    "FullKV": "full",
    "HeadKV": "headkv",
    "KVPolicy": "base",
    "POLICIES": "registry",
    "PoD": "pod",
    "PyramidKV": "pyramidkv",
    "RazorAttention": "razor",
    "SnapKV": "snapkv",
    "StreamingLLM": "streamingllm",
    "compress_layer": "base",
    "get_policy": "registry",
    "policy_class": "registry",
    "policy_names": "registry",
    "register": "registry",
    "select_tokens": "scoring",
    "unregister": "registry",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
