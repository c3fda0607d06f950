#!/usr/bin/env bash
# Compile-check megalite's C++ sources (csrc/cpu, csrc/data) with another compiler than the build's.
#
#   CXX=g++-14 bash scripts/check_cpu_compile.sh
#   CXX=clang++ bash scripts/check_cpu_compile.sh
#   CXX="chroot /opt/trixie g++-13" bash scripts/check_cpu_compile.sh   # a compiler inside a chroot
#
# Compiles each source to an object in a temporary directory with setup.py's flags (-O3, not
# -fsyntax-only: GCC reports an always_inline/target mismatch only when it inlines, and that is how
# kernels_avx2.cpp once broke under GCC 13).  Include paths come from $PY's torch, pybind11 and numpy;
# for a chroot, bind-mount the repository, the environment, Python's include dir and $TMPDIR at the same
# paths inside it.  Exits non-zero if any source fails.  Not part of the test suite (bindings.cpp
# takes ~30 s per compiler); tests/ops/test_kernel_build.py checks the include rule that needs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
read -ra CXX_CMD <<< "${CXX:-c++}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check_cpu_compile.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "compiler: $("${CXX_CMD[@]}" --version | head -1)"

mapfile -t TORCH_INCLUDES < <("$PY" -c "from torch.utils import cpp_extension; print('\n'.join(cpp_extension.include_paths()))")
PY_INCLUDE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
PYBIND_INCLUDE="$("$PY" -c "import pybind11; print(pybind11.get_include())")"
NUMPY_INCLUDE="$("$PY" -c "import numpy; print(numpy.get_include())")"
CXX11_ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
torch_flags=(-D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -DTORCH_EXTENSION_NAME=_C -I"$PY_INCLUDE")
for dir in "${TORCH_INCLUDES[@]}"; do torch_flags+=(-isystem "$dir"); done

status=0
check() {   # check SOURCE FLAGS...: compile it, print the diagnostics, remember a failure
  local source="$1"; shift
  local log="$WORK/$(basename "$source").log" start=$SECONDS
  if "${CXX_CMD[@]}" -c "$source" -o "$WORK/$(basename "$source").o" -fPIC -O3 -std=c++17 -fopenmp \
      -I"$ROOT/csrc" "$@" >"$log" 2>&1; then
    echo "OK    ${source#$ROOT/} ($((SECONDS - start)) s)"
  else
    echo "FAIL  ${source#$ROOT/}"
    status=1
  fi
  sed 's/^/      /' "$log"
}

for source in "$ROOT"/csrc/cpu/*.cpp; do
  check "$source" -fno-math-errno "${torch_flags[@]}"
done
for source in "$ROOT"/csrc/data/*.cpp; do
  check "$source" -I"$PYBIND_INCLUDE" -I"$NUMPY_INCLUDE" -I"$PY_INCLUDE"
done

[ "$status" -eq 0 ] && echo "check_cpu_compile: every C++ source compiles" || echo "check_cpu_compile: FAILED"
exit "$status"
