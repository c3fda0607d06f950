"""benchmarks/profile_step.py: the kernel table of a step, and the kinds its rollup sums by."""
import os
import re
import subprocess
import sys

import pytest

from benchmarks.profile_step import kind_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matrix multiply"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matrix multiply"),
    ("void pytorch_flash::flash_fwd_kernel<...>", "attention"),
    ("void megalite::cuda::(anonymous namespace)::cached_forward_kernel<...> rms_norm", "norm"),
    ("megalite::adam_step_master", "optimizer"), ("aten::_foreach_norm", "optimizer"),
    ("aten::cat", "copy/cast/cat"), ("aten::masked_fill_", "elementwise"), ("aten::sum", "reduction"),
    ("some_unnamed_kernel", "other")])
def test_kinds(name, kind):
    assert kind_of(name) == kind


def test_quick_profile_prints_the_table_and_rollup():
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", "--quick", "--steps", "1",
                           "--warmup", "1", "--top", "5"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("share"))
    rows = lines[header + 1:header + 6]
    assert all(re.match(r"\s*[0-9.]+%\s+[0-9.]+\s+[0-9]+\s+", row) for row in rows), rows
    rollup = next(line for line in lines if line.startswith("by kind: "))
    shares = [float(x) for x in re.findall(r"([0-9.]+)%", rollup)]
    assert "matrix multiply" in rollup and sum(shares) == pytest.approx(100, abs=0.5)
