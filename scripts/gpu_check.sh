#!/usr/bin/env bash
# The GPU check, in one call on an H100/H200 (the device tool; see README "GPU path"):
# FlashInfer + SGLang's Python layer from .whl/ (scripts/gpu_bundle.sh), then, most important
# first: the FlashInfer ragged kernel vs the torch kernel; the headkv backend wrapping SGLang's
# FlashInfer backend on SGLang's attention test kit (decode, then extend/mixed); one decode
# step of a Llama-3-8B-shaped model at 32 x 32k, full vs headkv; the flashinfer_ext kernel tests.
# Only the FlashInfer cases of the backend kit run here (the torch_native ones are CPU CI's).
# The extend cases JIT-compile FlashInfer's prefill kernels: ~3 min on a fresh H200.
# Everything lands in OUTDIR. ~9 min in all on a fresh machine (keep the device call's
# timeout at 600 s).
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
timeout 90 $T tests/test_flashinfer_ragged.py > "$OUT/ragged_kernel.log" 2>&1
echo "ragged kernel tests rc=$?"; tail -4 "$OUT/ragged_kernel.log"
timeout 80 $T tests/test_backend_kit.py -k "flashinfer and decode_rows" > "$OUT/backend_decode.log" 2>&1
echo "backend decode tests rc=$?"; tail -6 "$OUT/backend_decode.log"
timeout 90 python3 benchmarks/gpu_decode_step.py --out "$OUT/decode_step_h200" > "$OUT/decode_step.log" 2>&1
echo "decode step rc=$?"; tail -3 "$OUT/decode_step.log"
timeout 220 $T tests/test_backend_kit.py -k "flashinfer and not decode_rows" > "$OUT/backend_extend.log" 2>&1
echo "backend extend/parity tests rc=$?"; tail -6 "$OUT/backend_extend.log"
timeout 60 $T tests/test_flashinfer_gpu.py tests/test_flashinfer_plan.py > "$OUT/flashinfer_ext.log" 2>&1
echo "flashinfer_ext tests rc=$?"; tail -4 "$OUT/flashinfer_ext.log"
