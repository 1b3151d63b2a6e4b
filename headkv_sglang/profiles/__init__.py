"""Head-importance profiles: how much each (layer, head) matters, as data files.

A profile is a JSON file written by ``python -m headkv_sglang.profile`` (HF
transformers, eager attention). It records the model's identity (architecture,
name, shape), the method and the parameters it ran with, and the tables:

* ``scores`` — float ``[num_layers][num_q_heads]``, one importance per query head
  (what the method measures; for ``razor`` the combination described below);
* ``kv_scores`` — float ``[num_layers][num_kv_heads]``: the mean of ``scores``
  over each GQA group (query heads ``g*G .. g*G+G-1`` share KV head ``g``). The
  serving side budgets KV heads, so this is the table it reads;
* ``razor`` only: ``echo`` and ``induction`` ``[num_layers][num_q_heads]`` and
  their group means ``kv_echo`` / ``kv_induction``. ``scores`` is then
  ``max(echo / max(echo), induction / max(induction))`` per head: each kind
  normalised by its strongest head, so one table ranks both kinds of head.
* ``d2o``: ``scores`` is each head's attention variance (density: low = dense), which
  the D2O policy turns into layer budgets.

Tables are plain nested lists (JSON-native); ``torch.as_tensor(p.kv_scores)``
gives a tensor. Each file ships with a heatmap PNG of the same stem. An optional
``config_match`` object lists ``config.json`` entries a model must have for the file
to be picked automatically (the shape alone does not tell Llama-3-8B from
Llama-3.1-8B).

Shipped in ``profiles/data/``: every method for the test model (SmolLM2-135M-Instruct),
and ``retrieval`` / ``r2`` for Meta-Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.2,
converted from the HeadKV authors' published scores by :mod:`.convert`.
:func:`shipped_profile` finds the one matching a model's HF ``config.json``;
:func:`missing_profile_message` says what to run when none does. Nothing here
imports SGLang.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
METHODS: tuple[str, ...] = ("retrieval", "r2", "razor", "d2o", "pod")
FORMAT_VERSION = 1

Table = list[list[float]]

_REQUIRED = ("architecture", "model_name", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
             "method", "parameters", "scores")
_SHAPE_FIELDS = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")


def kv_mean(table: Table, num_kv_heads: int) -> Table:
    """``[L][H_q]`` -> ``[L][H_kv]``: the mean over each GQA group of query heads."""
    out = []
    for row in table:
        g = len(row) // num_kv_heads
        out.append([sum(row[h * g:(h + 1) * g]) / g for h in range(num_kv_heads)])
    return out


def _table_shape(table: Any) -> str:
    if not isinstance(table, list):
        return type(table).__name__
    widths = sorted({len(r) if isinstance(r, list) else -1 for r in table})
    return f"[{len(table)}, {widths}]"


@dataclass
class HeadProfile:
    """One head-importance profile of one model, measured by one method.

    Construct with the ``scores`` (and, for razor, ``echo``/``induction``) tables;
    the ``kv_*`` aggregates are derived (if given, e.g. when loading a file, they
    must equal the derived ones). Raises ValueError naming the field on any
    inconsistency.
    """

    architecture: str
    model_name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    method: str
    parameters: dict[str, Any]
    scores: Table
    echo: Table | None = None
    induction: Table | None = None
    kv_scores: Table | None = None
    kv_echo: Table | None = None
    kv_induction: Table | None = None
    config_match: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._validate_header()
        for name in ("scores", "echo", "induction"):
            table = getattr(self, name)
            if table is None:
                if name == "scores" or self.method == "razor":
                    raise ValueError(f"field {name!r} is missing (method {self.method!r} needs it)")
                continue
            table = self._validate_table(name, table, self.num_q_heads)
            setattr(self, name, table)
            kv_name = "kv_" + name
            derived = kv_mean(table, self.num_kv_heads)
            given = getattr(self, kv_name)
            if given is not None:
                given = self._validate_table(kv_name, given, self.num_kv_heads)
                if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for ra, rb in zip(given, derived) for a, b in zip(ra, rb)):
                    raise ValueError(f"field {kv_name!r} is not the mean of {name!r} over each GQA group")
            setattr(self, kv_name, derived)

    # ------------------------------------------------------------------ validation
    def _validate_header(self) -> None:
        for name in ("architecture", "model_name"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"field {name!r} must be a string, got {getattr(self, name)!r}")
        for name in _SHAPE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"field {name!r} must be an int >= 1, got {v!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"field 'num_q_heads' ({self.num_q_heads}) is not a multiple of 'num_kv_heads' ({self.num_kv_heads})"
            )
        if self.method not in METHODS:
            raise ValueError(f"field 'method' must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.parameters, dict):
            raise ValueError(f"field 'parameters' must be a JSON object, got {type(self.parameters).__name__}")
        if self.config_match is not None and not isinstance(self.config_match, dict):
            raise ValueError(f"field 'config_match' must be a JSON object, got {type(self.config_match).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"field 'format_version' is {self.format_version!r}; this version of headkv_sglang reads "
                f"{FORMAT_VERSION}: re-run `python -m headkv_sglang.profile`"
            )

    def _validate_table(self, name: str, table: Any, width: int) -> Table:
        ok = (isinstance(table, list) and len(table) == self.num_layers
              and all(isinstance(r, list) and len(r) == width for r in table))
        if not ok:
            raise ValueError(f"{name} has shape {_table_shape(table)}, expected [{self.num_layers}, {width}]")
        out = []
        for layer, row in enumerate(table):
            for head, x in enumerate(row):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise ValueError(f"{name}[{layer}][{head}] must be a finite number >= 0, got {x!r}")
            out.append([float(x) for x in row])
        return out

    def check_model(self, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError, naming both shapes, unless the served model has this profile's shape."""
        mine = (self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)
        theirs = (num_layers, num_q_heads, num_kv_heads, head_dim)
        if mine != theirs:
            raise ValueError(
                f"profile is for {self.model_name} (layers, query heads, KV heads, head_dim) = {mine}, "
                f"the served model has {theirs}; profile this model with "
                f"`python -m headkv_sglang.profile --model DIR --method {self.method} --out FILE`"
            )

    # ------------------------------------------------------------------ queries
    def top_heads(self, k: int, table: str = "scores") -> list[tuple[int, int]]:
        """The ``k`` highest (layer, head) of a table, ties to the lower (layer, head)."""
        return top_heads(getattr(self, table), k)

    # ------------------------------------------------------------------ files
    def to_json(self) -> str:
        data = asdict(self)
        order = ["format_version", "model_name", "architecture", *_SHAPE_FIELDS, "method", "parameters",
                 "config_match", "scores", "kv_scores", "echo", "kv_echo", "induction", "kv_induction"]
        # One line per scalar and per layer keeps the file diffable and readable.
        items = []
        for k in order:
            v = data.get(k)
            if v is None:
                continue
            if isinstance(v, list):
                rows = ",\n  ".join(json.dumps(r) for r in v)
                items.append(f' "{k}": [\n  {rows}\n ]')
            else:
                items.append(f" {json.dumps(k)}: {json.dumps(v)}")
        return "{\n" + ",\n".join(items) + "\n}\n"

    def save(self, path: str | os.PathLike, heatmap: bool = True) -> Path:
        """Write the JSON (atomically) and, unless ``heatmap=False``, ``<stem>.png`` next to it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        if heatmap:
            self.heatmap(path.with_suffix(".png"))
        return path

    def heatmap(self, png: str | os.PathLike) -> Path:
        """Layers x query heads heatmap(s) of the tables, KV groups marked, titled with model + method."""
        try:
            import matplotlib
        except ImportError as e:
            raise ModuleNotFoundError("the profile heat map needs matplotlib, which serving does not: "
                                      "pip install 'headkv-sglang[plots]'", name="matplotlib") from e

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("importance", self.scores)]
        if self.method == "razor":
            panels = [("echo", self.echo), ("induction", self.induction), ("combined (max of normalised)", self.scores)]
        elif self.method == "d2o":
            panels = [("attention variance (low = dense)", self.scores)]
        group = self.num_q_heads // self.num_kv_heads
        width = max(2.4, 0.32 * self.num_q_heads + 1.4)
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 0.6, max(4.0, 0.2 * self.num_layers + 1.6)),
                                 squeeze=False)
        for ax, (title, table) in zip(axes[0], panels):
            im = ax.imshow(table, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
            for g in range(1, self.num_kv_heads):
                ax.axvline(g * group - 0.5, color="white", lw=0.8, alpha=0.7)
            ax.set_xlabel(f"query head (KV groups of {group})")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(self.num_q_heads))
            ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
        fig.suptitle(f"{self.model_name} — {self.method} head importance", fontsize=10)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return Path(png)


def top_heads(table: Table, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest (layer, head) entries of a ``[L][H]`` table, ties to the lower index."""
    flat = [(-v, (layer, head)) for layer, row in enumerate(table) for head, v in enumerate(row)]
    flat.sort()
    return [lh for _, lh in flat[:k]]


def load_profile(path: str | os.PathLike) -> HeadProfile:
    """Read and validate a profile; ValueError names the path and the offending field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read head profile ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: head profile is not valid JSON ({getattr(e, 'msg', e)}{where})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a head profile is a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: head profile is missing field(s) {missing}")
    known = {f.name for f in fields(HeadProfile)}
    try:
        return HeadProfile(**{k: v for k, v in data.items() if k in known})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def cached_profile(path: str | os.PathLike) -> HeadProfile:
    """:func:`load_profile`, parsed once per version of the file (path, mtime, size) in a
    process: the server resolves a profile for every new budget (``--kv-budget 5%`` makes
    one per prompt length), in admission and in the forward. The object is shared by every
    caller: read it, do not modify it."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return load_profile(p)  # its error names the path and the reason
    return _load_version(os.path.abspath(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=32)
def _load_version(path: str, mtime_ns: int, size: int) -> HeadProfile:
    return load_profile(path)


def shipped_profiles() -> list[Path]:
    """All profile JSONs shipped in ``headkv_sglang/profiles/data``, sorted."""
    return sorted(DATA_DIR.glob("*.json"))


def _config_shape(model_config: dict) -> tuple[str, tuple[int | None, ...], str]:
    cfg = model_config.get("text_config") or model_config
    q = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // q if q and cfg.get("hidden_size") else None)
    shape = (cfg.get("num_hidden_layers"), q, cfg.get("num_key_value_heads", q), head_dim)
    arch = (model_config.get("architectures") or cfg.get("architectures") or [""])[0]
    name = Path(str(model_config.get("_name_or_path", ""))).name
    return arch, shape, name


def _config_agrees(prof: HeadProfile, model_config: dict) -> bool:
    cfg = model_config.get("text_config") or model_config
    return all(cfg.get(k) == v for k, v in (prof.config_match or {}).items())


def shipped_profile(model_config: dict, method: str) -> Path | None:
    """The shipped ``method`` profile for a model, given its HF ``config.json`` as a dict.

    A profile matches when architecture and shape (layers, query heads, KV heads,
    head_dim) agree and, if the profile has ``config_match``, each of those
    ``config.json`` entries equals the model's (so scores measured on one checkpoint
    are not picked for another of the same shape); among several matches one whose
    model name equals the config's ``_name_or_path`` wins. Returns None when nothing
    matches.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    arch, shape, name = _config_shape(model_config)
    matches = []
    for path in shipped_profiles():
        try:
            prof = cached_profile(path)
        except ValueError:
            continue  # a broken shipped file is the test suite's to report, not a reason to fail here
        mine = (prof.num_layers, prof.num_q_heads, prof.num_kv_heads, prof.head_dim)
        if prof.method == method and prof.architecture == arch and mine == shape and _config_agrees(prof, model_config):
            matches.append((prof.model_name != name, path))
    return min(matches)[1] if matches else None


def missing_profile_message(model_config: dict, method: str, model_path: str | None = None) -> str:
    """What to tell a user whose model has no shipped ``method`` profile: the exact command that makes one.

    ``model_path`` (the server's ``--model-path``) fills in the command when known.
    """
    arch, (layers, q, kv, _), name = _config_shape(model_config)
    name = Path(str(model_path)).name if model_path else (name or "MODEL")
    out = f"{name}.{method}.json"
    have = [m for m in METHODS if shipped_profile(model_config, m) is not None]
    also = f"; shipped for this model: {', '.join(have)}" if have else ""
    return (f"no shipped '{method}' profile matches this model ({arch}, {layers} layers, {q} query / {kv} KV heads"
            f"{also}); make one on a GPU with `headkv-sglang profile --model {model_path or 'MODEL_DIR'} "
            f"--method {method} --out {out}` (needs the weights; see docs/policies-and-profiles.md) and pass "
            f"`--kv-head-profile {out}`")


__all__ = [
    "DATA_DIR",
    "FORMAT_VERSION",
    "METHODS",
    "HeadProfile",
    "cached_profile",
    "kv_mean",
    "load_profile",
    "missing_profile_message",
    "shipped_profile",
    "shipped_profiles",
    "top_heads",
]
