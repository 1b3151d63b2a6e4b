"""What `pip install .` installs: the wheel's contents and metadata, pip's resolver installing it
with sglang==0.5.23 for Python 3.12, and the wheel alone in a fresh venv picking the shipped
profiles. (A full 3.12 server smoke needs SGLang's ~11 GB in a second venv: too slow for CI.)"""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = out.glob("headkv_sglang-*.whl")
    return whl


def _metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_wheel_installs_only_our_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"headkv_sglang", "flashinfer_ext", "headkv_sglang_boot.pth"}, tops
    assert "headkv_sglang/programs/long_doc_qa.py" in names
    assert "headkv_sglang/programs/examples/orbital_report.txt" in names
    for model in ("Meta-Llama-3-8B-Instruct", "Mistral-7B-Instruct-v0.2", "SmolLM2-135M-Instruct"):
        assert f"headkv_sglang/profiles/data/{model}.r2.json" in names
    assert not [n for n in names if "profiles/sources" in n]  # the raw scores stay in the repository
    with zipfile.ZipFile(wheel) as z:
        (ep,) = [n for n in names if n.endswith("entry_points.txt")]
        entry_points = z.read(ep).decode()
    assert "headkv-sglang = headkv_sglang.cli:main" in entry_points
    assert "headkv_sglang = headkv_sglang.plugin:register" in entry_points


def test_metadata_admits_3_11_and_3_12_and_serving_needs_only_sglang(wheel):
    meta = _metadata(wheel)
    spec = SpecifierSet(meta["Requires-Python"])
    assert "3.11.7" in spec and "3.12.1" in spec and "3.10.13" not in spec
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = {str(r) for r in reqs if r.marker is None}
    assert runtime == {"sglang==0.5.23", "tqdm>=4.60"}, runtime
    extras = {}
    for r in reqs:
        if r.marker is not None:
            for extra in ("dev", "plots", "test"):
                if r.marker.evaluate({"extra": extra}):
                    extras.setdefault(extra, set()).add(r.name)
    assert extras["dev"] == {"gguf", "accelerate"} and extras["plots"] == {"matplotlib"}
    assert {"gguf", "accelerate", "matplotlib", "pytest"} <= extras["test"]


def test_pip_resolves_the_wheel_with_sglang_on_python_3_12(wheel, tmp_path):
    """pip's resolver, targeting CPython 3.12 and binary wheels only, installs the wheel and
    sglang 0.5.23 with all of its dependencies (a dry run: nothing is downloaded but metadata)."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                        "--python-version", "3.12", "--only-binary=:all:", "--report", str(report), str(wheel)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got["headkv-sglang"] == "0.1.0" and got["sglang"] == "0.5.23", sorted(got)
    assert "matplotlib" not in got and "accelerate" not in got  # extras stay out of a serving install


def _python312() -> str:
    for cand in ("python3.12", str(Path.home() / ".pyenv/versions/3.12.1/bin/python")):
        path = shutil.which(cand)
        if path and subprocess.run([path, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"]).returncode == 0:
            return path
    return sys.executable  # no 3.12 here: the fresh-venv check still runs, on this interpreter


def test_wheel_alone_in_a_fresh_venv_selects_the_shipped_profiles(wheel, tmp_path):
    """Without its dependencies (no torch, no SGLang) the installed package still starts every
    interpreter (the boot .pth), finds its shipped profiles and answers `headkv-sglang --help`."""
    venv = tmp_path / "venv"
    subprocess.run([_python312(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:  # what pip --no-deps does for a pure wheel, minus the scripts
        z.extractall(site)
    from test_shipped_profiles import LLAMA3_8B_INSTRUCT, MISTRAL_7B_INSTRUCT_V02

    code = ("import json, sys; from headkv_sglang import profiles as p; "
            "print(json.dumps([p.shipped_profile(json.loads(c), 'r2').name for c in sys.argv[1:]]))")
    r = subprocess.run([str(py), "-c", code, json.dumps(LLAMA3_8B_INSTRUCT), json.dumps(MISTRAL_7B_INSTRUCT_V02)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["Meta-Llama-3-8B-Instruct.r2.json", "Mistral-7B-Instruct-v0.2.r2.json"]
    r = subprocess.run([str(py), "-m", "headkv_sglang.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "profile" in r.stdout, r.stderr


def test_missing_extras_are_named(monkeypatch, tmp_path, capsys):
    """Serving installs neither [dev] nor [plots]: what needs them says which extra to install."""
    import importlib.util

    from headkv_sglang.dev import models
    from test_profile import _profile

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(models.ModelError, match=r"needs gguf, which serving does not: pip install 'headkv-sglang\[dev\]'"):
        models.require_dev_extra()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    models.require_dev_extra()  # installed here: no error
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'headkv-sglang\[plots\]'"):
        _profile().save(tmp_path / "p.json")
    assert (tmp_path / "p.json").is_file()  # the JSON is written before the heat map fails
    from headkv_sglang.profile import main

    (tmp_path / "config.json").write_text("{}")  # no weights: the check must come before any loading
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--method", "r2", "--out", str(tmp_path / "x.json")])
    assert "the heat-map PNG needs matplotlib: pip install 'headkv-sglang[plots]'" in capsys.readouterr().err
