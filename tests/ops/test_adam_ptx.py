"""What --use_fast_math leaves of CUDA Adam's arithmetic, read from the PTX that nvcc makes of
csrc/adam_math.h with setup.py's flags -- a compile, no device (skipped where nvcc is missing).

Fast math turns `a / b` into an approximate division and `sqrtf` into an approximate square root (a
couple of ulps each); adam_update spells both with the correctly rounded intrinsics, so the PTX must
hold div.rn / sqrt.rn and no approximate division, square root or reciprocal.  What fast math still
changes -- contracted multiply-adds, flushed subnormals (.ftz) -- is what adam_math.h says."""
import ast
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
KERNEL = """
#include "adam_math.h"
__global__ void update(float* p, float* m, float* v, const float* g, megalite::AdamHyper h) {
  const int i = threadIdx.x;
  megalite::adam_update(p[i], m[i], v[i], g[i], h);
}
"""
APPROXIMATE = ("div.approx", "div.full", "sqrt.approx", "rsqrt.approx", "rcp.approx")


def nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc")
                                     if os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK) else None)
    if found is None:
        pytest.skip("nvcc not found (CUDA_HOME or PATH)")
    return found


def setup_nvcc_flags():
    """setup.py's NVCC_FLAGS, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["NVCC_FLAGS"])


def ptx_of(tmp_path, csrc=CSRC, arch="sm_90"):
    source = tmp_path / "adam_update.cu"
    source.write_text(KERNEL)
    out = tmp_path / "adam_update.ptx"
    subprocess.run([nvcc(), "-ptx", f"-arch={arch}", *setup_nvcc_flags(), f"-I{csrc}",
                    str(source), "-o", str(out)], check=True, capture_output=True, text=True)
    return out.read_text()


def arithmetic(ptx):
    return [line.split()[0] for line in ptx.splitlines()
            if line.strip() and line.split()[0].startswith(("div.", "sqrt.", "rsqrt.", "rcp.", "fma.", "ex2."))]


def test_adam_divides_and_takes_roots_correctly_rounded_under_fast_math(tmp_path):
    ops = arithmetic(ptx_of(tmp_path))
    assert sum(op.startswith("div.rn") for op in ops) == 2, ops   # sqrt(v) / bc2, m / denom
    assert sum(op.startswith("sqrt.rn") for op in ops) == 1, ops
    assert not [op for op in ops if op.startswith(APPROXIMATE)], ops
