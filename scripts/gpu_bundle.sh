#!/usr/bin/env bash
# Pack what the GPU machine lacks into .whl/ (git-ignored): a pruned copy of this venv's
# flashinfer-python (Python files, headers and the top-level CUDA sources its JIT compiles;
# no prebuilt kernels, no MoE/GEMM sources) and the cp312 apache-tvm-ffi wheel it imports.
# Also SGLang's Python layer (../shared/gpu-sglang/sglang_bundle.sh, ~14 MB) into .whl/sglang.
# The device tool carries .whl/ (64 MiB limit; this is ~30 MB); scripts/gpu_check.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
SP=$(python -c 'import flashinfer, os; print(os.path.dirname(os.path.dirname(flashinfer.__file__)))')
FI=$(python -c 'import flashinfer; print(flashinfer.__version__)')
TVM=$(python -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
mkdir -p .whl
rm -f .whl/flashinfer_min.tar.xz .whl/apache_tvm_ffi-*.whl
list=$(mktemp)
( cd "$SP"
  find flashinfer -path flashinfer/data -prune -o -name __pycache__ -prune -o -type f -print | grep -v 'artifacts/.*\.json$'
  find flashinfer/data/include flashinfer/data/spdlog flashinfer/data/cccl flashinfer/data/cutlass/include \
       flashinfer/data/cutlass/tools/util/include -type f -not -path '*__pycache__*'
  find flashinfer/data/csrc -maxdepth 1 -type f ) > "$list"
tar -C "$SP" -cJf .whl/flashinfer_min.tar.xz -T "$list"
rm -f "$list"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "apache-tvm-ffi==$TVM"
# SGLang's Python layer (attention backends, pools, its attention test kit) + stubs: .whl/sglang
[[ -f .whl/sglang/sglang_min.tar.xz ]] || bash "${SGLANG_BUNDLE_SH:-../shared/gpu-sglang/sglang_bundle.sh}" .whl/sglang
echo "flashinfer $FI, apache-tvm-ffi $TVM:"; ls -la .whl .whl/sglang
