#!/usr/bin/env bash
# The GPU check, in one call on an H100/H200 (the device tool; see README "GPU path"):
# FlashInfer + SGLang's Python layer from .whl/ (scripts/gpu_bundle.sh), then, most important
# first: the FlashInfer ragged kernel vs the torch kernel (eager, and one CUDA graph replayed
# after re-plans); the flashinfer_ext kernel tests (GPU compression among them); compression's
# share of TTFT at 8k/32k; one decode step of a Llama-3-8B-shaped model at 32 x 32k, full vs
# headkv (plan cost split, the graphed kernel); the headkv backend wrapping SGLang's FlashInfer
# backend on SGLang's attention test kit (decode rows, then extend/mixed with what time is
# left: those JIT-compile FlashInfer's prefill, ~3 min on a fresh H200). Only the FlashInfer
# cases of the backend kit run here (the torch_native ones are CPU CI's).
# Everything lands in OUTDIR. Stops itself before 570 s (keep the device call's timeout at 600 s).
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SGLANG_FLASHINFER_USE_TENSOR_CORE=false
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
{ nvidia-smi; nvcc --version | tail -2; python3 -c 'import torch; print("torch", torch.__version__)'; } > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/apache_tvm_ffi-*.whl \
  && tar -xJf .whl/flashinfer_min.tar.xz -C /tmp/site || { echo "flashinfer bundle install failed"; exit 2; }
eval "$(bash scripts/gpu_sglang_install.sh .whl/sglang /tmp/site_sgl)" || { echo "sglang bundle install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PYTHONPATH:$PWD
python3 -c 'import sglang.srt.layers.attention.flashinfer_backend, flashinfer_ext.ragged, headkv_sglang.serving.backend; print("imports ok")' \
  > "$OUT/imports.log" 2>&1; echo "imports rc=$?"; tail -3 "$OUT/imports.log"
T="python3 -m pytest -q -p no:cacheprovider --noconftest -ra"
step() {  # step NAME TIMEOUT CMD...: run with at most TIMEOUT s, never past the 570 s deadline
  local name=$1 limit=$2; shift 2
  local left=$((570 - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, no time left"; return; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$? (${SECONDS}s)"; tail -5 "$OUT/$name.log"
}
step ragged_kernel 150 $T tests/test_flashinfer_ragged.py
step flashinfer_ext 100 $T tests/test_flashinfer_gpu.py tests/test_flashinfer_plan.py
step compress 100 python3 benchmarks/gpu_compress.py --out "$OUT/compress_h200"
step decode_step 120 python3 benchmarks/gpu_decode_step.py --profile 3 --out "$OUT/decode_step_h200"
step backend_decode 80 $T tests/test_backend_kit.py -k "flashinfer and decode_rows"
step backend_extend 220 $T tests/test_backend_kit.py -k "flashinfer and not decode_rows"
# the device returns at most 8 files: logs go back in one archive, results as they are
tar -czf "$OUT/logs.tgz" -C "$OUT" --remove-files $(cd "$OUT" && ls *.log env.txt 2>/dev/null)
ls "$OUT"
