"""KVPolicyConfig: the server's compression settings and per-request overrides.

Pure Python + torch: the SGLang coupling (argparse hook, env transport) lives in
``plugin.py``. The launcher resolves the flags into a :class:`KVPolicyConfig`, validates
it against the model's ``config.json`` (before any weights load) and hands it to the
scheduler processes as JSON in ``$HEADKV_SGLANG_CONFIG`` (``ServerArgs`` is pickled
without unknown fields).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Torch-free: the registry imports the policy classes only on lookup.
from headkv_sglang.policies import defaults
from headkv_sglang.policies.registry import POLICIES, policy_class

ENV_VAR = "HEADKV_SGLANG_CONFIG"
#: The --kv-policy choices: the policies registered when this module was imported
#: (validate() asks the live registry, so one registered later is accepted too).
POLICY_CHOICES = tuple(POLICIES)
POOLING_CHOICES = defaults.POOLINGS

# Per-request keys accepted in sampling_params.custom_params, and the config field each sets.
REQUEST_KEYS = {
    "kv_policy": "policy",
    "kv_budget": "budget",
    "kv_window": "window",
    "kv_min_prompt": "min_prompt",
    "kv_sink_size": "sink_size",
    "kv_beta": "beta",
    "kv_floor_alpha": "floor_alpha",
    "kv_kernel_size": "kernel_size",
    "kv_pooling": "pooling",
    "kv_razor_fraction": "razor_fraction",
}
MAX_BUDGET = 1 << 20
AUTO_WINDOW = 32


class ConfigError(ValueError):
    """An invalid setting; the message names the flag (or request key), the value and what is allowed."""


@dataclass(frozen=True)
class KVPolicyConfig:
    """Resolved compression settings (server defaults or one request's).

    ``budget`` is tokens kept per KV head on average, window and sinks included
    (see ``policies/base.py``); ``window``: observation window, ``0`` = automatic
    (:attr:`obs_window`); ``min_prompt``: prompts with fewer tokens stay
    uncompressed; ``pool_fraction``: share of SGLang's KV token capacity moved to the
    compressed pool; ``page_size``: tokens per page of the compressed pool. The
    policies' hyperparameters default to ``policies/defaults.py``, as the classes do.
    """

    policy: str = "full"
    budget: int = 128
    window: int = 0  # 0: automatic, see obs_window
    min_prompt: int = 0
    head_profile: str | None = None
    beta: float = defaults.HEADKV_BETA  # HeadKV
    pyramid_beta: float = defaults.PYRAMID_BETA  # PyramidKV
    sink_size: int = defaults.SINK_SIZE  # StreamingLLM, RazorAttention
    floor_alpha: float = defaults.FLOOR_ALPHA  # AdaKV
    kernel_size: int = defaults.KERNEL_SIZE
    pooling: str = defaults.POOLING
    razor_fraction: float = defaults.RAZOR_FRACTION  # RazorAttention: share of heads kept whole
    pool_fraction: float = 0.5
    page_size: int = 16

    @property
    def obs_window(self) -> int:
        """The observation window used: ``window``, or when 0, ``min(32, max(1, budget // 4))``.

        32 (SnapKV's default) covers the question of a chat turn plus the template's tail;
        a quarter of the budget at most leaves room to select at small budgets.
        """
        return self.window or min(AUTO_WINDOW, max(1, self.budget // 4))

    # ------------------------------------------------------------------ validation
    def validate(self, flag: str = "--kv-{}", changed: frozenset[str] = frozenset()) -> "KVPolicyConfig":
        """Raise ConfigError naming ``flag.format(name)`` for the first invalid field.

        ``changed``: fields a request overrode; a conflict between an overridden field and
        a server default is reported under the overridden one.
        """

        def bad(name: str, value: Any, allowed: str) -> ConfigError:
            shown = name.replace("_", "-") if flag.startswith("--") else name
            return ConfigError(f"{flag.format(shown)}: invalid value {value!r}; {allowed}")

        def intval(name: str, lo: int, hi: int = MAX_BUDGET) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise bad(name, v, f"expected an integer in [{lo}, {hi}]")

        def floatval(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                raise bad(name, v, f"expected a number in {'(' if lo_open else '['}{lo}, {hi}]")

        if self.policy not in POLICIES:
            raise bad("policy", self.policy, f"choose one of {', '.join(POLICIES)}")
        intval("budget", 1)
        intval("window", 0, 4096)
        intval("min_prompt", 0)
        intval("sink_size", 0, 4096)
        intval("kernel_size", 1, 63)
        if self.kernel_size % 2 == 0:
            raise bad("kernel_size", self.kernel_size, "expected an odd integer")
        if self.pooling not in POOLING_CHOICES:
            raise bad("pooling", self.pooling, f"choose one of {', '.join(POOLING_CHOICES)}")
        floatval("beta", 1.0, 1e6)
        floatval("pyramid_beta", 1.0, 1e6)
        floatval("floor_alpha", 0.0, 1.0)
        floatval("razor_fraction", 0.0, 1.0)
        floatval("pool_fraction", 0.0, 0.95, lo_open=True)
        intval("page_size", 1, 4096)
        policy_class(self.policy).check_config(self, bad, changed)  # its cross-field rules
        if self.head_profile is not None and not Path(self.head_profile).is_file():
            raise bad("head_profile", self.head_profile, "no such file")
        return self

    # ------------------------------------------------------------------ overrides
    def with_request(self, custom_params: dict[str, Any] | None) -> "KVPolicyConfig":
        """This config with a request's ``kv_*`` overrides applied and validated.

        Keys not starting with ``kv_`` belong to other features and are ignored; an
        unknown ``kv_*`` key is an error.
        """
        if not custom_params:
            return self
        if not isinstance(custom_params, dict):
            raise ConfigError(f"custom_params must be a JSON object, got {type(custom_params).__name__}")
        changes: dict[str, Any] = {}
        for key, value in custom_params.items():
            if not isinstance(key, str) or not key.startswith("kv_"):
                continue
            if key not in REQUEST_KEYS:
                raise ConfigError(
                    f"custom_params.{key}: unknown key; allowed: {', '.join(sorted(REQUEST_KEYS))}"
                )
            name = REQUEST_KEYS[key]
            expected = _FIELD_TYPES[name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if type(value) is not expected:
                raise ConfigError(
                    f"custom_params.{key}: invalid value {value!r}; expected {expected.__name__}"
                )
            changes[name] = value
        if not changes:
            return self
        return dataclasses.replace(self, **changes).validate(flag="custom_params.kv_{}", changed=frozenset(changes))

    # ------------------------------------------------------------------ transport
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KVPolicyConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_env(cls) -> "KVPolicyConfig | None":
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else None


# Declared types of the config fields (a value built as ``beta=2`` is still a float field).
_FIELD_TYPES = {f.name: {"int": int, "float": float, "str": str}.get(str(f.type), object)
                for f in dataclasses.fields(KVPolicyConfig)}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str = ""
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_model_path(cls, model_path: str | os.PathLike) -> "ModelShape":
        path = Path(model_path) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model-path: cannot read {path} ({e}); --kv-policy needs a local HF model directory") from e
        cfg = cfg.get("text_config", cfg)
        q = int(cfg["num_attention_heads"])
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            num_q_heads=q,
            num_kv_heads=int(cfg.get("num_key_value_heads", q)),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // q),
            architecture=(cfg.get("architectures") or [""])[0],
            hf_config=cfg,
        )
