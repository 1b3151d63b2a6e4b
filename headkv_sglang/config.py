"""KVPolicyConfig: the server's compression settings and per-request overrides.

Pure Python (torch is imported on first use of a policy's settings, not by this module):
the SGLang coupling (argparse hook, env transport) lives in ``plugin.py``. Every setting is
declared once, as a dataclass field with :func:`~headkv_sglang.policies.params.hyper`:
the server's own below (budget, window, ...), each policy's hyperparameters on its class
(``policies/*.py``). The flags (:func:`settings`, ``plugin.py``), the per-request keys
(:func:`request_keys`), the validation messages (:meth:`KVPolicyConfig.validate`) and the
config's attributes are generated from them. The launcher resolves the flags into a
:class:`KVPolicyConfig`, validates it against the model's ``config.json`` (before any
weights load) and hands it to the scheduler processes as JSON in ``$HEADKV_SGLANG_CONFIG``
(``ServerArgs`` is pickled without unknown fields).
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
from headkv_sglang.policies.params import AS_DEFAULT, MAX_INT, ConfigError, Param, field_param, hyper
from headkv_sglang.policies.registry import POLICIES, policy_class, policy_params

if TYPE_CHECKING:
    from headkv_sglang.question import QuestionFinder

__all__ = ["ConfigError", "KVPolicyConfig", "ModelShape", "parse_budget", "budget_fields", "settings",
           "request_keys", "settings_table"]

ENV_VAR = "HEADKV_SGLANG_CONFIG"
#: The --kv-policy choices: the policies registered when this module was imported
#: (validate() asks the live registry, so one registered later is accepted too).
POLICY_CHOICES = tuple(POLICIES)

MAX_BUDGET = MAX_INT
AUTO_WINDOW = 32
AUTO_QUESTION = 16  # of 16/32/64: scoring_calibration.md before 2026-12-04 (git history)
# 8 found 9/24 answers at 2% against 16's 4/24 (5%: 15 vs 16; question_kernel_calibration.md) and
# took headkv on the needle grid from 36% / 72% of full to 51% / 74% at 2% / 5%
# (fidelity_needles30_q8_cpu.md), but 4 and 6 found 2/24 at 2% (question_length_calibration.md):
# 8 fits these tasks' question ending, and the other policies did not gain from it (docs/policies-and-profiles.md).
#: What scores by default ("auto"): the question, for a prompt that holds its question. On 24
#: calibration cases the fidelity grid does not use (benchmarks/results/scoring_calibration.md) it
#: found as many answers as the window or more in every cell, headkv at 5%: 16/24 vs 11/24 (full KV
#: 19/24). A document compressed alone to be shared (``kv_share`` with ``max_new_tokens`` 0) has no
#: question: "auto" scores it with DOCUMENT_SCORING (benchmarks/results/multi_question_cpu.md).
DEFAULT_SCORING = "auto"
DOCUMENT_SCORING = "reconstruct"
#: What scores the prompt's tokens: its question (the last user turn, before the chat
#: template's tail; see headkv_sglang/question.py), SnapKV's window (the last tokens), or, without
#: a question, the document's own queries ("self": the most attention any of them gives a token)
#: or those of a pass repeating it ("reconstruct", KVzip: headkv_sglang/reconstruct.py).
SCORING_CHOICES = ("auto", "question", "window", "self", "reconstruct", "accumulated")
AGNOSTIC_SCORINGS = ("self", "reconstruct", "accumulated")
#: How question-agnostic scores spend the budget (KVPolicyConfig.agnostic_select).
AGNOSTIC_SELECT_CHOICES = ("policy", "global")
AGNOSTIC_SELECT_DEFAULT = "global"
RAZOR_HEADS_CHOICES = defaults.RAZOR_HEADS
POOLING_CHOICES = defaults.POOLINGS
_RATIO = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
BUDGET_FORMS = "an integer in [1, 1048576] (tokens per KV head) or a share of the prompt like '5%' (0% < share <= 100%)"


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
    return {"budget": budget if not ratio else _DEFAULT_BUDGET, "budget_ratio": ratio}


def _budget_arg(text: str) -> Any:
    """``--kv-budget`` as typed: ``"128"`` is tokens (an int), anything else is left for
    :func:`parse_budget` (a share like ``"5%"``, or its error message)."""
    raw = text.strip()
    return int(raw) if raw.isdigit() else raw


def _profile_exists(path: Any) -> str | None:
    return None if path is None or Path(path).is_file() else "no such file"


def _policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


_DEFAULT_BUDGET = 128
#: --kv-memory: "auto" resolves to one of the other two at start-up (KVPolicyConfig.with_memory_resolved)
MEMORY_CHOICES = ("auto", "shared", "split")


@dataclass(frozen=True)
class KVPolicyConfig:
    """Resolved compression settings (server defaults or one request's).

    The fields are the server's own settings, each declared with its flag, request key,
    help and rule (:func:`~headkv_sglang.policies.params.hyper`). ``budget`` is tokens kept
    per KV head on average, window and sinks included (see ``policies/base.py``);
    ``budget_ratio`` > 0 makes the budget a share of each prompt instead (``--kv-budget
    5%``: :meth:`for_prompt` resolves it per request, at least
    :meth:`~headkv_sglang.policies.base.KVPolicy.min_budget`).

    The policies' hyperparameters (``beta``, ``sink_size``, ``kernel_size``, ...) are
    declared on the policy classes (:func:`settings` lists them all) and read as attributes
    (``cfg.sink_size``); they are passed to the constructor and to
    :func:`dataclasses.replace` as keywords like the fields, and held in :attr:`params`
    (only those that differ from their default, sorted by name, so that equal configs
    compare and hash equal).
    """

    policy: str = hyper("full", "Head-level KV compression policy (headkv_sglang). Unset: plain SGLang.",
                        choices=_policy_names, flag_default=None)
    budget: int = hyper(_DEFAULT_BUDGET, "Prompt tokens kept per KV head on average, window and sinks included: "
                        "a number of tokens (128) or a share of each prompt (5%).",
                        low=1, parse=budget_fields, flag_type=_budget_arg)
    budget_ratio: float = 0.0  # > 0: the budget is this share of each prompt (see for_prompt); set by --kv-budget
    window: int = hyper(0, "Recent prompt tokens always kept (with --kv-scoring window they also score the rest); "
                        "0, the default: min(32, budget/4).", low=0, high=4096)
    scoring: str = hyper(DEFAULT_SCORING, "What ranks prompt tokens: 'question' (the last user turn's last "
                         "--kv-question tokens, before the chat template's tail), 'window' (SnapKV: the last "
                         "--kv-window tokens), or without the question 'self' (the most attention any prompt "
                         "token gives it), 'reconstruct' (KVzip: a pass that repeats the document after it "
                         "scores it; the request's prefill is about twice as long) or 'accumulated' (H2O and "
                         "D2O: the attention every prompt token gives it, summed). 'auto', the default: "
                         f"'{DOCUMENT_SCORING}' for a document shared before its questions (kv_share with "
                         "max_new_tokens 0), else 'question'.", choices=SCORING_CHOICES)
    question: int = hyper(0, "Most question tokens that score the prompt (0, the default: 16).", low=0, high=4096)
    agnostic_kernel: int = hyper(1, "Max-pooling width of the question-agnostic scores (--kv-scoring self / "
                                 "reconstruct / accumulated), odd: the tokens next to one the pass attends to are "
                                 "kept with it "
                                 "(1, the default: none, as KVzip).", low=1, high=63, odd=True)
    agnostic_select: str = hyper(AGNOSTIC_SELECT_DEFAULT, "How a question-agnostic scoring (--kv-scoring self / "
                                 "reconstruct / accumulated) spends the budget: 'global', the default (KVzip: the "
                                 "highest scores "
                                 "of every (layer, KV head) compete for all layers x KV heads x budget tokens, each "
                                 "row keeping its window) or 'policy' (each row keeps the policy's own budget: "
                                 "headkv's profile, adakv's allocation, ...).", choices=AGNOSTIC_SELECT_CHOICES)
    min_prompt: int = hyper(0, "Prompts shorter than this stay uncompressed.", low=0)
    decode_budget: int = hyper(0, "Generated tokens kept per KV head of a compressed request: once its decode tail "
                               "outgrows the window by a chunk, the older generated tokens are ranked by the recent "
                               "queries and the best this many move into its pages (0, the default: the tail stays "
                               "whole). A prompt too short to save memory by compressing is then kept whole in "
                               "pages, so its output can move. Not with razor.", low=0)
    share: bool = hyper(False, "Share compressed prompts: a request whose prompt extends an earlier compressed "
                        "prompt under the same settings (a document sent once, then questions about it) reads "
                        "that prompt's pages instead of compressing its own copy; its own extension stays whole. "
                        "Per request: \"kv_share\": true.")
    head_profile: str | None = hyper(None, "Head-importance profile JSON (default: the shipped one matching the "
                                     "model).", type=str, request=False, check=_profile_exists)
    pool_fraction: float = hyper(0.5, "Share of SGLang's KV token capacity moved to the compressed pool of "
                                 "--kv-memory split (0.5 when not given; giving it makes 'auto' mean 'split').",
                                 low=0.0, low_open=True, high=0.95, request=False, flag_default=None)
    page_size: int = hyper(16, "Tokens per page of the compressed pool.", low=1, high=4096, request=False)
    memory: str = hyper("auto", "Where compressed pages live: 'shared' (one memory: pages live inside SGLang's "
                        "token slots, borrowed from its token allocator in chunks and given back when a chunk "
                        "empties; under --tp the ranks borrow and give back together; compressed rows never run "
                        "as CUDA graphs), 'split' (--kv-pool-fraction of SGLang's KV capacity becomes a pool of "
                        "its own) or 'auto', the default: 'shared' on CPU, 'split' on CUDA (where FlashInfer has "
                        "not yet read pages inside SGLang's slots on a GPU) and whenever --kv-pool-fraction is "
                        "given.", choices=MEMORY_CHOICES, request=False)
    #: The policies' hyperparameters that differ from their declared defaults: sorted ``(name, value)``.
    params: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: a policy hyperparameter at its default
        # (set ones are in __dict__), or one registered after this config was made.
        if name.startswith("_"):
            raise AttributeError(name)
        entry = policy_params().get(name)
        if entry is None:
            raise AttributeError(f"KVPolicyConfig has no setting {name!r}; the registered ones: "
                                 f"{', '.join(p.name for p in settings())}")
        return entry[0].default

    def as_dict(self) -> dict[str, Any]:
        """Every setting by name, the policies' hyperparameters flat (what :meth:`to_json` writes)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        out.update((name, getattr(self, name)) for name in policy_params())
        return out

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

    def resolve_scoring(self, document: bool, reconstructed: bool = True) -> "KVPolicyConfig":
        """This config with ``scoring="auto"`` resolved: DOCUMENT_SCORING for a ``document``
        (compressed before any question: ``kv_share`` with ``max_new_tokens`` 0), else
        ``"question"``. A ``"reconstruct"`` without the pass (not a ``document``, or
        ``reconstructed=False``: the prompt carries none) becomes ``"self"``."""
        scoring = self.scoring
        if scoring == "auto":
            scoring = DOCUMENT_SCORING if document else "question"
        if scoring == "reconstruct" and not (document and reconstructed):
            scoring = "self"  # no reconstruction pass: a question of a shared document, or too long a one
        return self if scoring == self.scoring else dataclasses.replace(self, scoring=scoring)

    def scoring_span(self, finder: QuestionFinder, prompt_ids: Sequence[int], seq_len: int) -> tuple[int, int]:
        """The positions ``[start, end)`` whose queries score a ``seq_len``-token prompt's tokens.

        ``scoring="question"`` (and ``"auto"``): the question, found by ``finder`` (a
        :class:`~headkv_sglang.question.QuestionFinder`) in ``prompt_ids`` (the original
        prompt; a retracted request's ``seq_len`` also counts its outputs); ``"window"``: the
        last ``obs_window`` tokens (SnapKV); ``"self"``, ``"accumulated"``: all of them. (``"reconstruct"``: the
        repetition's, ``headkv_sglang.reconstruct``; the serving layer knows where it is.)
        """
        if self.scoring == "window":
            return seq_len - min(self.obs_window, seq_len), seq_len
        if self.scoring in AGNOSTIC_SCORINGS:
            return 0, seq_len
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
        """Raise ConfigError naming ``flag.format(name)`` for the first invalid setting.

        The settings are checked in :func:`settings` order, each by its declared rule; then
        the rules between settings (the policy's ``check_config``). ``changed``: settings a
        request overrode; a conflict between an overridden setting and a server default is
        reported under the overridden one.
        """

        def bad(name: str, value: Any, allowed: str) -> ConfigError:
            shown = name.replace("_", "-") if flag.startswith("--") else name
            return ConfigError(f"{flag.format(shown)}: invalid value {value!r}; {allowed}")

        for p in settings():
            value = getattr(self, p.name)
            allowed = p.problem(value)
            if allowed is not None:
                raise bad(p.name, value, allowed)
            if p.name == "budget" and not (isinstance(self.budget_ratio, float) and 0.0 <= self.budget_ratio <= 1.0):
                raise bad("budget", f"{self.budget_ratio * 100:g}%", "expected a share in (0%, 100%]")
        if self.share and self.decode_budget:
            name = "decode_budget" if "decode_budget" in changed else "share"
            raise bad(name, getattr(self, name), "kv_share and kv_decode_budget do not combine yet (a shared "
                      "prompt's pages cannot grow with one request's generated tokens)")
        policy_class(self.policy).check_config(self, bad, changed)  # its cross-field rules
        return self

    def with_memory_resolved(self, *, cpu: bool, fraction_given: bool) -> "KVPolicyConfig":
        """``memory`` 'auto' made 'shared' or 'split' (see its help); ``cpu``: the server runs
        on CPU (the torch kernel reads either memory), ``fraction_given``: --kv-pool-fraction
        was on the command line. Raises ConfigError when --kv-pool-fraction sizes a pool that
        --kv-memory shared does not have."""
        if self.memory == "shared" and fraction_given:
            raise ConfigError(f"--kv-pool-fraction: invalid value {self.pool_fraction!r}; it sizes the compressed "
                              "pool of --kv-memory split, and with --kv-memory shared the pages live in SGLang's "
                              "token slots: leave it out (or use --kv-memory split)")
        if self.memory != "auto":
            return self
        return dataclasses.replace(self, memory="shared" if cpu and not fraction_given else "split")

    # ------------------------------------------------------------------ overrides
    def with_request(self, custom_params: dict[str, Any] | None) -> "KVPolicyConfig":
        """This config with a request's ``kv_*`` overrides applied and validated.

        Keys not starting with ``kv_`` belong to other features and are ignored; an
        unknown ``kv_*`` key is an error, and so is a value of another JSON type than the
        setting's (an integral float is an int, an int a float).
        """
        if not custom_params:
            return self
        if not isinstance(custom_params, dict):
            raise ConfigError(f"custom_params must be a JSON object, got {type(custom_params).__name__}")
        keys = request_keys()
        changes: dict[str, Any] = {}
        changed: set[str] = set()
        for key, value in custom_params.items():
            if not isinstance(key, str) or not key.startswith("kv_"):
                continue
            p = keys.get(key)
            if p is None:
                raise ConfigError(f"custom_params.{key}: unknown key; allowed: {', '.join(sorted(keys))}")
            changed.add(p.name)
            if p.parse is not None:
                changes.update(p.parse(value, f"custom_params.{key}"))
                continue
            value = p.coerce(value)
            if type(value) is not p.type:
                raise ConfigError(f"custom_params.{key}: invalid value {value!r}; expected {p.type.__name__}")
            changes[p.name] = value
        if not changes:
            return self
        return dataclasses.replace(self, **changes).validate(flag="custom_params.kv_{}", changed=frozenset(changed))

    # ------------------------------------------------------------------ transport
    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KVPolicyConfig":
        """The config :meth:`to_json` wrote; unknown names (a newer version's) are ignored."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)} | set(policy_params())
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_env(cls) -> "KVPolicyConfig | None":
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else None


_fields_init = KVPolicyConfig.__init__
_FIELDS = frozenset(f.name for f in dataclasses.fields(KVPolicyConfig))


def _init(self: KVPolicyConfig, *args: Any, params: Any = (), **kwargs: Any) -> None:
    """The dataclass ``__init__``, plus the policies' hyperparameters as keywords.

    ``params``: pairs (or a dict) as held in :attr:`KVPolicyConfig.params`; keywords win.
    """
    declared = policy_params()
    given = dict(params.items() if isinstance(params, dict) else (tuple(kv) for kv in params))
    given.update((k, kwargs.pop(k)) for k in list(kwargs) if k not in _FIELDS)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TypeError(f"KVPolicyConfig got unknown setting(s) {unknown}; the registered policies declare "
                        f"{', '.join(declared)}")
    kept: dict[str, Any] = {}
    for name, value in given.items():
        p = declared[name][0]
        value = p.coerce(value) if p.type is float else value  # beta=2 is the float 2.0
        if not (type(value) is type(p.default) and value == p.default):
            kept[name] = value
    _fields_init(self, *args, params=tuple(sorted(kept.items())), **kwargs)
    for name, value in kept.items():  # plain attributes: cfg.beta without __getattr__
        object.__setattr__(self, name, value)


KVPolicyConfig.__init__ = _init  # type: ignore[method-assign]


def settings() -> list[Param]:
    """Every setting: the server's (``KVPolicyConfig``'s fields), then each registered
    policy's hyperparameters in registration order. Flags, request keys and validation
    come from these."""
    own = [p for p in map(field_param, dataclasses.fields(KVPolicyConfig)) if p is not None]
    names = {p.name for p in own}
    extra = [p for p, _ in policy_params().values()]
    clash = names & {p.name for p in extra}
    assert not clash, f"policies declare settings that KVPolicyConfig has: {sorted(clash)}"
    return own + extra


def request_keys() -> dict[str, Param]:
    """The per-request keys (``custom_params``) and the setting each sets."""
    return {p.key: p for p in settings() if p.key is not None}


def settings_table() -> str:
    """A Markdown table of every setting: flag, request key, default, meaning (for the docs)."""
    users = {name: used for name, (_, used) in policy_params().items()}
    rows = ["| flag | request key | default | meaning |", "| --- | --- | --- | --- |"]
    for p in settings():
        default = p.default if p.flag_default is AS_DEFAULT else p.flag_default
        shown = "unset" if default is None else ("off" if default is False else f"`{default}`")
        meaning = p.help + (f" Policies: {', '.join(users[p.name])}." if p.name in users else "")
        rows.append(f"| `{p.flag}` | {f'`{p.key}`' if p.key else '(server only)'} | {shown} | {meaning} |")
    return "\n".join(rows)


def __getattr__(name: str) -> Any:
    if name == "REQUEST_KEYS":  # request key -> setting name, of the policies registered now
        return {key: p.name for key, p in request_keys().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


if __name__ == "__main__":  # python -m headkv_sglang.config: the settings table for the docs
    print(settings_table())
