"""Convert the HeadKV authors' published head scores into shipped profiles.

``python -m headkv_sglang.profiles.convert`` rewrites ``profiles/data/<model>.{retrieval,r2}.json``
(and their heat-map PNGs) from the copies of ``Important_Head/head_score/*.json`` of
https://github.com/FYYFU/HeadKV committed under ``profiles/sources/FYYFU-HeadKV/``;
``--check`` only verifies that the shipped JSONs equal what the conversion writes, byte for
byte (no plotting, no network).

A source file maps ``"layer-head"`` (query head) to the list of that head's score in each
counted detection trial; HeadKV's own loader (``headkv/snapkv_utils.py``) takes the mean of each
list. The conversion takes that mean (``math.fsum(list) / len(list)``, exactly rounded, so it
does not depend on numpy's summation order) as ``scores[layer][head]``; ``kv_scores`` is then
the mean over each GQA group, the same :func:`~headkv_sglang.profiles.kv_mean` our profiler's
files use. The ``*_retrieval_heads.json`` files become method ``retrieval`` (Wu et al.'s
copy-paste score, as our profiler's ``retrieval``), ``*_retrieval_reasoning_heads.json``
method ``r2`` (what ``--kv-policy headkv`` reads). The published ``r2`` scores sum over the
answer steps without our profiler's ``1 / len(answer)``; the HeadKV policy normalises the
table, so only the ratios between heads matter.

Each profile carries ``config_match``: entries of the model's ``config.json`` (vocabulary,
RoPE base, context) that tell the scored checkpoint apart from others of the same shape
(Llama-3.1-8B, Mistral-7B v0.1/v0.3), so the shipped file is only picked for the model the
scores were measured on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headkv_sglang.profiles import DATA_DIR, HeadProfile

SOURCE_DIR = Path(__file__).parent / "sources" / "FYYFU-HeadKV"
SOURCE_REPO = "https://github.com/FYYFU/HeadKV"
#: The repository commit the sources were read at (the head_score files last changed in 84e4c2b).
SOURCE_COMMIT = "0862a0955fe82e9ff611d59541918e02c5def625"
SOURCE_PATH = "Important_Head/head_score"
PAPER = "Fu et al. 2024, Not All Heads Matter, https://arxiv.org/abs/2410.19258"
CONVERSION = ("scores[l][h] = math.fsum(source['l-h']) / len(source['l-h']) (the mean HeadKV's loader takes); "
              "kv_scores = mean of scores over each GQA group (headkv_sglang.profiles.kv_mean)")
KINDS = {"retrieval_heads": "retrieval", "retrieval_reasoning_heads": "r2"}


@dataclass(frozen=True)
class Model:
    """A model the authors published scores for: its shape and identifying config entries."""

    name: str
    hf_repo: str
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    config_match: dict[str, Any]


MODELS = (
    Model("Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "LlamaForCausalLM", 32, 32, 8, 128,
          {"vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192}),
    Model("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", "MistralForCausalLM", 32, 32, 8, 128,
          {"vocab_size": 32000, "rope_theta": 1000000.0, "max_position_embeddings": 32768}),
)


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's contents (``git hash-object``): ties a copy to the upstream blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_scores(path: Path, num_layers: int, num_q_heads: int) -> list[list[float]]:
    """``[num_layers][num_q_heads]`` mean scores from one source file; ValueError on any mismatch."""
    data = json.loads(path.read_text())
    expected = {f"{layer}-{head}" for layer in range(num_layers) for head in range(num_q_heads)}
    if set(data) != expected:
        extra, missing = sorted(set(data) - expected)[:3], sorted(expected - set(data))[:3]
        raise ValueError(f"{path}: keys are not 'layer-head' for {num_layers} layers x {num_q_heads} query heads "
                         f"(unexpected {extra}, missing {missing})")
    out = []
    for layer in range(num_layers):
        row = []
        for head in range(num_q_heads):
            trials = data[f"{layer}-{head}"]
            if not isinstance(trials, list) or not trials:
                raise ValueError(f"{path}: '{layer}-{head}' must be a non-empty list of trial scores")
            row.append(math.fsum(trials) / len(trials))
        out.append(row)
    return out


def convert(model: Model, kind: str, source_dir: Path = SOURCE_DIR) -> HeadProfile:
    """The profile of ``model`` from its ``<name>_<kind>.json`` source (kind in :data:`KINDS`)."""
    file = f"{model.name}_{kind}.json"
    path = source_dir / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the sources live in the repository checkout (not in the wheel); "
                                f"copy {SOURCE_REPO}/blob/{SOURCE_COMMIT}/{SOURCE_PATH}/{file} there")
    raw = path.read_bytes()
    counts = {len(v) for v in json.loads(raw).values()}
    return HeadProfile(
        architecture=model.architecture,
        model_name=model.name,
        num_layers=model.num_layers,
        num_q_heads=model.num_q_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        method=KINDS[kind],
        parameters={
            "source": "published head scores of the HeadKV authors (" + PAPER + ")",
            "source_repo": SOURCE_REPO,
            "source_commit": SOURCE_COMMIT,
            "source_file": f"{SOURCE_PATH}/{file}",
            "source_blob_sha1": git_blob_sha1(raw),
            "hf_model": model.hf_repo,
            "trials_per_head": sorted(counts),
            "conversion": CONVERSION,
            "command": "python -m headkv_sglang.profiles.convert",
        },
        scores=read_scores(path, model.num_layers, model.num_q_heads),
        config_match=dict(model.config_match),
    )


def outputs(source_dir: Path = SOURCE_DIR) -> list[tuple[Path, HeadProfile]]:
    """Every (shipped path, converted profile) pair."""
    return [(DATA_DIR / f"{m.name}.{method}.json", convert(m, kind, source_dir))
            for m in MODELS for kind, method in KINDS.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.profiles.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="verify the shipped JSONs byte for byte; write nothing")
    p.add_argument("--source-dir", type=Path, default=SOURCE_DIR)
    p.add_argument("--out-dir", type=Path, default=None, help="write here instead of profiles/data")
    args = p.parse_args(argv)
    stale = []
    for path, prof in outputs(args.source_dir):
        if args.check:
            if not path.is_file() or path.read_text() != prof.to_json():
                stale.append(path)
            continue
        out = path if args.out_dir is None else args.out_dir / path.name
        prof.save(out)
        print(f"wrote {out} (+ .png)")
    if stale:
        print("differ from the conversion: " + ", ".join(map(str, stale))
              + "\nre-run `python -m headkv_sglang.profiles.convert`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
