#!/usr/bin/env bash
# The README's run command: bootstrap the venv, fetch the test model, serve it, ask it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m headkv_sglang.dev.demo "$@"
