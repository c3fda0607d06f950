#!/usr/bin/env bash
# Compile-check megalite's CUDA sources on a machine without a GPU (it needs nvcc, not a device).
#
#   bash scripts/check_cuda_compile.sh            # nvcc from $NVCC, $CUDA_HOME/bin or /usr/local/cuda/bin
#   NVCC_ARCH=sm_80 bash scripts/check_cuda_compile.sh
#
# Compiles every csrc/cuda/*.cu with nvcc to an object file in a temporary directory, with the flags
# setup.py uses (-O3 --use_fast_math -std=c++17, the csrc include dir) plus host warnings, and compiles
# csrc/cuda/bindings.cpp against the installed torch's headers (torch.utils.cpp_extension.include_paths()
# and the CUDA include dir).  The CPU torch wheel ships the c10/cuda headers, so this works with the
# CPU-only torch too.  Exits non-zero on the first error; prints every warning.  It only proves the
# code compiles: nothing here runs a kernel.  Not part of the test suite (it takes a few minutes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
ARCH="${NVCC_ARCH:-sm_90}"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
CXX="${CXX:-g++}"

if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found at $NVCC; set NVCC=/path/to/nvcc or CUDA_HOME" >&2
  exit 2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "nvcc: $("$NVCC" --version | tail -1)"
echo "host compiler: $("$CXX" --version | head -1)"
echo "arch: $ARCH; objects in $WORK (removed on exit)"

status=0
warnings=0
check() {   # check LABEL COMMAND...: run it, show its diagnostics, count warnings, remember failure
  local label="$1"; shift
  local log="$WORK/$(basename "$label").log"
  local start=$SECONDS
  if "$@" >"$log" 2>&1; then
    local count
    count=$(grep -c -i "warning" "$log" || true)
    warnings=$((warnings + count))
    echo "OK    $label ($((SECONDS - start)) s, $count warning lines)"
  else
    echo "FAIL  $label"
    status=1
  fi
  sed 's/^/      /' "$log"
}

for source in "$ROOT"/csrc/cuda/*.cu; do
  check "nvcc ${source#$ROOT/}" "$NVCC" -c "$source" -o "$WORK/$(basename "$source").o" \
    -arch="$ARCH" -O3 --use_fast_math -std=c++17 -I"$ROOT/csrc" \
    -Xcompiler -Wall,-Wextra --Werror cross-execution-space-call
done

# The torch-facing translation unit: what setup.py's CUDAExtension compiles with the host compiler.
mapfile -t TORCH_INCLUDES < <("$PY" -c "from torch.utils import cpp_extension; print('\n'.join(cpp_extension.include_paths()))")
PY_INCLUDE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
CXX11_ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
include_flags=(-I"$ROOT/csrc" -I"$CUDA_HOME/include" -I"$PY_INCLUDE")
for dir in "${TORCH_INCLUDES[@]}"; do include_flags+=(-isystem "$dir"); done
# A CPU torch wheel ships c10/cuda but not its build-generated cuda_cmake_macros.h (whose one
# macro, C10_CUDA_BUILD_SHARED_LIBS, matters only on Windows); skip it the way HIP builds do.
extra_defines=()
if [ ! -f "${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo "note: this torch lacks c10/cuda/impl/cuda_cmake_macros.h (a CPU wheel): -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
  extra_defines+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
for source in "$ROOT"/csrc/cuda/*.cpp; do
  check "$CXX ${source#$ROOT/}" "$CXX" -c "$source" -o "$WORK/$(basename "$source").o" -fPIC \
    -O3 -std=c++17 -Wall -Wextra -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -DUSE_CUDA "${extra_defines[@]}" "${include_flags[@]}"
done

if [ "$status" -ne 0 ]; then
  echo "check_cuda_compile: FAILED (see the errors above)"
else
  echo "check_cuda_compile: all CUDA sources compile ($warnings warning lines); none has run on a GPU here"
fi
exit "$status"
