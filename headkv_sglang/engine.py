"""SGLang's offline ``Engine`` with ``--kv-policy`` settings, in-process.

``sglang.Engine(**kwargs)`` builds ``ServerArgs`` from keyword arguments, which know
nothing of the plugin's flags. :func:`kv_engine` takes the same ``kv_*`` settings as the
command line (``kv_policy="headkv", kv_budget=128, kv_pool_fraction=0.5`` ...), validates
them exactly as the launcher does (a bad value raises :class:`ConfigError` before any
weights load), publishes them to the scheduler subprocess the way the launcher does, and
returns the Engine::

    from headkv_sglang.engine import kv_engine
    engine = kv_engine(model_path, kv_policy="headkv", kv_budget=128)
    out = engine.generate("...", {"max_new_tokens": 32, "custom_params": {"kv_budget": 64}})
"""

from __future__ import annotations

import os
from typing import Any

from headkv_sglang.config import ENV_VAR, ConfigError, KVPolicyConfig, ModelShape, budget_fields
from headkv_sglang.policies.registry import resolve_profile


def kv_config(model_path: str, **kv: Any) -> KVPolicyConfig:
    """A validated config from ``kv_<field>`` keywords (``kv_policy`` required)."""
    from headkv_sglang.plugin import FLAGS, cpu_auto

    fields = {flag[2:].replace("-", "_"): dest for flag, (dest, _) in FLAGS.items()}
    unknown = sorted(set(kv) - set(fields))
    if unknown:
        raise ConfigError(f"unknown KV setting(s) {unknown}; allowed: {sorted(fields)}")
    if kv.get("kv_policy") is None:
        raise ConfigError("kv_policy is required (one of full, headkv, snapkv, pyramidkv, adakv, streamingllm, razor)")
    values = {fields[k]: v for k, v in kv.items() if v is not None}
    if "budget" in values:  # tokens (128) or a share of each prompt ("5%")
        values.update(budget_fields(values["budget"], "kv_budget"))
    cfg = KVPolicyConfig(**values).validate()
    cfg = cfg.with_memory_resolved(cpu=cpu_auto(), fraction_given="pool_fraction" in values)
    resolve_profile(cfg, ModelShape.from_model_path(model_path))
    return cfg


def kv_engine(model_path: str, **kwargs: Any):
    """``sglang.Engine(model_path=..., **server_kwargs)`` serving with the given ``kv_*`` settings."""
    kv = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("kv_")}
    cfg = kv_config(str(model_path), **kv)
    # The plugin reads the config from the environment in every process it loads into
    # (this one, at Engine construction, and the spawned scheduler).
    os.environ[ENV_VAR] = cfg.to_json()
    import sglang as sgl

    return sgl.Engine(model_path=str(model_path), **kwargs)
