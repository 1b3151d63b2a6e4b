#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): bootstrap, fetch the model, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m headkv_sglang.dev.models fetch >/dev/null
exec python -m pytest "$@"
