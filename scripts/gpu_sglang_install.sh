#!/usr/bin/env bash
# (from shared/gpu-sglang: shared/ does not travel to the device machine, so the repo carries its copy)
# On the GPU machine (no network): unpack the bundle into /tmp/site_sgl; prints the PYTHONPATH to use.
set -euo pipefail
B=${1:-.whl/sglang}; T=${2:-/tmp/site_sgl}
mkdir -p "$T"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$T" "$B"/wheels/*.whl
tar -xJf "$B/sglang_min.tar.xz" -C "$T"
echo "export PYTHONPATH=$T:$(cd "$B/stubs" && pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
