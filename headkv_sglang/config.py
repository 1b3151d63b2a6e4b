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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Torch-free: the registry imports the policy classes only on lookup.
from headkv_sglang.policies import defaults
from headkv_sglang.policies.registry import POLICIES, policy_class

if TYPE_CHECKING:
    from headkv_sglang.question import QuestionFinder

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
    "kv_scoring": "scoring",
    "kv_question": "question",
    "kv_min_prompt": "min_prompt",
    "kv_sink_size": "sink_size",
    "kv_beta": "beta",
    "kv_floor_alpha": "floor_alpha",
    "kv_kernel_size": "kernel_size",
    "kv_pooling": "pooling",
    "kv_pool_shift": "pool_shift",
    "kv_razor_fraction": "razor_fraction",
    "kv_razor_heads": "razor_heads",
    "kv_d2o_merge": "d2o_merge",
    "kv_d2o_layers": "d2o_layers",
    "kv_pod_share": "pod_share",
    "kv_decode_budget": "decode_budget",
    "kv_share": "share",
}
MAX_BUDGET = 1 << 20
AUTO_WINDOW = 32
AUTO_QUESTION = 16  # of 16/32/64: scoring_calibration.md before 2026-12-04 (git history)
# 8 found 9/24 answers at 2% against 16's 4/24 (5%: 15 vs 16; question_kernel_calibration.md) and
# took headkv on the needle grid from 36% / 72% of full to 51% / 74% at 2% / 5%
# (fidelity_needles30_q8_cpu.md), but 4 and 6 found 2/24 at 2% (question_length_calibration.md):
# 8 fits these tasks' question ending, and the other policies did not gain from it (README).
#: What scores by default: the question. On 24 calibration cases the fidelity grid does not use
#: (benchmarks/results/scoring_calibration.md) it found as many answers as the window or more in
#: every cell, headkv at 5%: 16/24 vs 11/24 (full KV 19/24).
DEFAULT_SCORING = "question"
#: What scores the prompt's tokens: its question (the last user turn, before the chat
#: template's tail; see headkv_sglang/question.py) or SnapKV's window (the last tokens).
SCORING_CHOICES = ("question", "window")
#: How RazorAttention picks its retrieval heads: a fixed fraction of the heads (the
#: paper's 15%), or as many as the budget pays for (held KV <= L * H * budget).
RAZOR_HEADS_CHOICES = ("fraction", "budget")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
BUDGET_FORMS = "an integer in [1, 1048576] (tokens per KV head) or a share of the prompt like '5%' (0% < share <= 100%)"


class ConfigError(ValueError):
    """An invalid setting; the message names the flag (or request key), the value and what is allowed."""


@dataclass(frozen=True)
class KVPolicyConfig:
    """Resolved compression settings (server defaults or one request's).

    ``budget`` is tokens kept per KV head on average, window and sinks included
    (see ``policies/base.py``); ``scoring``: what ranks the prompt's tokens, its question
(``"question"``: at most ``question`` queries, 0 = :data:`AUTO_QUESTION`, from the last user
turn before the template's tail) or SnapKV's window (``"window"``: the last ``window``
tokens); ``budget_ratio`` > 0 makes the budget a share of each
    prompt instead (``--kv-budget 5%``: :meth:`for_prompt` resolves it per request, at
    least :meth:`~headkv_sglang.policies.base.KVPolicy.min_budget`); ``window``: observation window, ``0`` = automatic
    (:attr:`obs_window`); ``min_prompt``: prompts with fewer tokens stay
    uncompressed; ``pool_fraction``: share of SGLang's KV token capacity moved to the
    compressed pool; ``page_size``: tokens per page of the compressed pool;
    ``decode_budget``: generated tokens kept per KV head once they move into the pages
    (decode-phase compression, ``policies/decode.py``; 0: the decode tail stays whole);
    ``share``: a compressed prompt is reused by later requests whose prompts extend it
    (``kv/manager.py``, shared prefixes). The
    policies' hyperparameters default to ``policies/defaults.py``, as the classes do.
    """

    policy: str = "full"
    budget: int = 128
    budget_ratio: float = 0.0  # > 0: the budget is this share of each prompt (see for_prompt)
    window: int = 0  # 0: automatic, see obs_window
    scoring: str = DEFAULT_SCORING  # "question" or "window": see headkv_sglang/question.py
    question: int = 0  # 0: automatic, see question_len
    min_prompt: int = 0
    head_profile: str | None = None
    beta: float = defaults.HEADKV_BETA  # HeadKV
    pyramid_beta: float = defaults.PYRAMID_BETA  # PyramidKV
    sink_size: int = defaults.SINK_SIZE  # StreamingLLM, RazorAttention, D2O
    floor_alpha: float = defaults.FLOOR_ALPHA  # AdaKV
    kernel_size: int = defaults.KERNEL_SIZE
    pooling: str = defaults.POOLING
    pool_shift: int = defaults.POOL_SHIFT  # pooling window moved this many tokens to the past
    razor_fraction: float = defaults.RAZOR_FRACTION  # RazorAttention: share of heads kept whole
    razor_heads: str = "fraction"  # RazorAttention: "fraction" (razor_fraction) or "budget" (matched)
    d2o_merge: str = defaults.D2O_MERGE  # D2O: merge dropped tokens into similar kept ones ("on"/"mean"/"off")
    d2o_layers: str = defaults.D2O_LAYERS  # D2O: layer budgets from the profile's density or uniform
    pod_share: float = defaults.POD_SHARE  # PoD: share of rows that reuse the layer below's distant attention
    decode_budget: int = 0  # generated tokens kept per KV head (policies/decode.py); 0: the tail stays whole
    share: bool = False  # the compressed prompt is shared with later requests that extend it (kv/manager.py)
    pool_fraction: float = 0.5
    page_size: int = 16

    @property
    def obs_window(self) -> int:
        """The observation window used: ``window``, or when 0, ``min(32, max(1, budget // 4))``.

        32 (SnapKV's default) covers the question of a chat turn plus the template's tail;
        a quarter of the budget at most leaves room to select at small budgets.
        """
        return self.window or min(AUTO_WINDOW, max(1, self.budget // 4))

    @property
    def question_len(self) -> int:
        """Most scoring queries taken from the question: ``question`` or, when 0, 16
        (the best of 16/32/64 on 15 calibration cases: 6/15 answers at 2%, 0/15 with 32 or 64;
        ``benchmarks/results/scoring_calibration.md`` before 2026-12-04, in the git history)."""
        return self.question or AUTO_QUESTION

    def scoring_span(self, finder: QuestionFinder, prompt_ids: Sequence[int], seq_len: int) -> tuple[int, int]:
        """The positions ``[start, end)`` whose queries score a ``seq_len``-token prompt's tokens.

        ``scoring="question"``: the question, found by ``finder`` (a
        :class:`~headkv_sglang.question.QuestionFinder`) in ``prompt_ids`` (the original
        prompt; a retracted request's ``seq_len`` also counts its outputs); ``"window"``: the
        last ``obs_window`` tokens (SnapKV).
        """
        if self.scoring == "window":
            return seq_len - min(self.obs_window, seq_len), seq_len
        return finder.span(prompt_ids, self.question_len)

    @property
    def budget_label(self) -> str:
        """The budget as the user gave it: ``"128"`` or ``"5%"``."""
        return f"{self.budget_ratio * 100:g}%" if self.budget_ratio else str(self.budget)

    def for_prompt(self, seq_len: int) -> "KVPolicyConfig":
        """This config with a ratio budget resolved for a ``seq_len``-token prompt.

        ``budget = max(ceil(budget_ratio * seq_len), policy.min_budget(cfg))``: the share of
        the prompt, but never less than what the policy always keeps (the window / the
        sinks + one recent token). Absolute budgets are returned unchanged.
        """
        if not self.budget_ratio:
            return self
        share = math.ceil(self.budget_ratio * max(int(seq_len), 1) - 1e-9)
        budget = min(MAX_BUDGET, max(share, policy_class(self.policy).min_budget(self)))
        return self if budget == self.budget else dataclasses.replace(self, budget=budget)

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
        if not (isinstance(self.budget_ratio, float) and 0.0 <= self.budget_ratio <= 1.0):
            raise bad("budget", f"{self.budget_ratio * 100:g}%", "expected a share in (0%, 100%]")
        intval("window", 0, 4096)
        if self.scoring not in SCORING_CHOICES:
            raise bad("scoring", self.scoring, f"choose one of {', '.join(SCORING_CHOICES)}")
        intval("question", 0, 4096)
        intval("min_prompt", 0)
        intval("sink_size", 0, 4096)
        intval("kernel_size", 1, 63)
        if self.kernel_size % 2 == 0:
            raise bad("kernel_size", self.kernel_size, "expected an odd integer")
        intval("pool_shift", 0, 31)
        if self.pooling not in POOLING_CHOICES:
            raise bad("pooling", self.pooling, f"choose one of {', '.join(POOLING_CHOICES)}")
        floatval("beta", 1.0, 1e6)
        floatval("pyramid_beta", 1.0, 1e6)
        floatval("floor_alpha", 0.0, 1.0)
        floatval("razor_fraction", 0.0, 1.0)
        if self.razor_heads not in RAZOR_HEADS_CHOICES:
            raise bad("razor_heads", self.razor_heads, f"choose one of {', '.join(RAZOR_HEADS_CHOICES)}")
        if self.d2o_merge not in defaults.D2O_MERGES:
            raise bad("d2o_merge", self.d2o_merge, f"choose one of {', '.join(defaults.D2O_MERGES)}")
        if self.d2o_layers not in defaults.D2O_LAYER_CHOICES:
            raise bad("d2o_layers", self.d2o_layers, f"choose one of {', '.join(defaults.D2O_LAYER_CHOICES)}")
        floatval("pod_share", 0.0, 0.5)
        intval("decode_budget", 0)
        if not isinstance(self.share, bool):
            raise bad("share", self.share, "expected true or false")
        if self.share and self.decode_budget:
            name = "decode_budget" if "decode_budget" in changed else "share"
            raise bad(name, getattr(self, name), "kv_share and kv_decode_budget do not combine yet (a shared "
                      "prompt's pages cannot grow with one request's generated tokens)")
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
            if name == "budget":
                budget, ratio = parse_budget(value, f"custom_params.{key}")
                changes["budget_ratio"] = ratio
                if not ratio:
                    changes["budget"] = budget
                continue
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
        changed = frozenset("budget" if n == "budget_ratio" else n for n in changes)
        return dataclasses.replace(self, **changes).validate(flag="custom_params.kv_{}", changed=changed)

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


def parse_budget(value: Any, where: str) -> tuple[int, float]:
    """``(budget, budget_ratio)`` from a ``--kv-budget`` / ``kv_budget`` value.

    Tokens per KV head (the integer ``128``) give ``(128, 0.0)``; a share of the prompt
    (``"5%"``) gives ``(0, 0.05)`` (the token budget is then resolved per prompt).
    Anything else raises ConfigError naming ``where``.
    """
    def bad() -> ConfigError:
        return ConfigError(f"{where}: invalid value {value!r}; expected {BUDGET_FORMS}")

    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_BUDGET:
            raise bad()
        return value, 0.0
    m = _RATIO.match(value) if isinstance(value, str) else None
    if m is None:
        raise bad()
    share = float(m.group(1)) / 100.0
    if not 0.0 < share <= 1.0:
        raise bad()
    return 0, share


def budget_fields(value: Any, where: str) -> dict[str, Any]:
    """The config fields a command-line or keyword budget sets: ``{"budget", "budget_ratio"}``.

    As :func:`parse_budget`; a share leaves ``budget`` at the default (unused until
    :meth:`KVPolicyConfig.for_prompt`)."""
    budget, ratio = parse_budget(value, where)
    return {"budget": budget if not ratio else KVPolicyConfig.budget, "budget_ratio": ratio}


# Declared types of the config fields (a value built as ``beta=2`` is still a float field).
_FIELD_TYPES = {f.name: {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), object)
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
