#!/usr/bin/env bash
# The GPU check, in one call on an H100/H200 (the device tool; see README "GPU path"):
# FlashInfer from .whl/ (scripts/gpu_bundle.sh), its decode module JIT-compiled and timed,
# the GPU tests, then benchmarks/kernels.py. Everything lands in OUTDIR.
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
{ nvidia-smi; nvcc --version | tail -2; python3 -c 'import torch; print("torch", torch.__version__)'; } > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/apache_tvm_ffi-*.whl \
  && tar -xJf .whl/flashinfer_min.tar.xz -C /tmp/site || { echo "bundle install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 - > "$OUT/jit.log" 2>&1 <<'PY'
import time, torch
from flashinfer_ext.decode import RaggedDecode
from flashinfer_ext.plan import DecodePlan
t = time.time()
rd = RaggedDecode("cuda")
plan = DecodePlan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                  torch.tensor([3], dtype=torch.int32), torch.tensor([3]), 1, 16)
rd.plan(plan, 4, 128, torch.bfloat16, 0.1)
kp = torch.randn(1, 16, 128, dtype=torch.bfloat16, device="cuda")
o, lse = rd.run(torch.randn(1, 1, 4, 128, dtype=torch.bfloat16, device="cuda"), kp, kp)
torch.cuda.synchronize()
print(f"decode module JIT-compiled and run in {time.time() - t:.1f} s; lse {lse.flatten().tolist()}")
PY
echo "jit rc=$?"; tail -3 "$OUT/jit.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider --noconftest -ra tests/test_flashinfer_gpu.py \
  tests/test_flashinfer_plan.py > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -15 "$OUT/gpu_tests.log"
timeout 280 python3 benchmarks/kernels.py --out "$OUT/kernels_h200" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?"; cat "$OUT/kernels_h200.md" 2>/dev/null || tail -30 "$OUT/kernels.log"
