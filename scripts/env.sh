#!/usr/bin/env bash
# Bootstraps (or reuses) the project's virtualenv and prints nothing but progress
# on stderr. Source it:  source scripts/env.sh
#
# The venv lives under $HEADKV_SGLANG_HOME (default ~/.cache/headkv_sglang) and is
# reused while the dependency set in pyproject.toml is unchanged: SGLang with its
# CUDA torch is ~11 GB and ~6 minutes to install, so we key the install on a hash
# of [project.dependencies, optional-dependencies, build-system] only.
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HEADKV_SGLANG_HOME="${HEADKV_SGLANG_HOME:-$HOME/.cache/headkv_sglang}"
_venv="${HEADKV_SGLANG_VENV:-$HEADKV_SGLANG_HOME/venv}"
_py="${HEADKV_SGLANG_PYTHON:-python3.11}"  # 3.12 works too (HEADKV_SGLANG_PYTHON=python3.12)
command -v "$_py" >/dev/null 2>&1 || _py=python3
"$_py" -c 'import sys; v = sys.version_info[:2]; assert v in ((3, 11), (3, 12)), f"headkv-sglang needs Python 3.11 or 3.12 (what SGLang 0.5.23 supports), {sys.executable} is {v[0]}.{v[1]}: set HEADKV_SGLANG_PYTHON"' 

_hash="$("$_py" - "$_repo/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
p = d["project"]
key = [p["dependencies"], p.get("optional-dependencies", {}), d["build-system"]]
print(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
PY
)"
_stamp="$_venv/.headkv_deps_$_hash"
# The package's own source is editable-installed, so code changes need no reinstall;
# the stamp also records which checkout the editable install points at.
if [[ ! -f "$_stamp" ]] || [[ "$(cat "$_stamp")" != "$_repo" ]]; then
  echo "[headkv-sglang] installing dependencies into $_venv (first time: ~6 min, ~11 GB)" >&2
  mkdir -p "$HEADKV_SGLANG_HOME"
  [[ -x "$_venv/bin/python" ]] || "$_py" -m venv "$_venv"
  # (grep drops pip's noise about this machine's unused local index paths)
  "$_venv/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  "$_venv/bin/python" -m pip install -q -e "$_repo[test]" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  rm -f "$_venv"/.headkv_deps_*
  echo "$_repo" > "$_stamp"
fi
export VIRTUAL_ENV="$_venv"
export PATH="$_venv/bin:$PATH"
export PYTHONUNBUFFERED=1
unset _repo _venv _py _hash _stamp
set +euo pipefail
