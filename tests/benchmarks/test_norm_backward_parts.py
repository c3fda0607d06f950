"""benchmarks/norm_backward_parts.py: the profiler's kernels grouped into the backward's parts per call;
without CUDA it says so and exits 0.  The CUDA run itself is a device check (scripts/gpu_check.sh)."""
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.norm_backward_parts import parts_of

ROOT = Path(__file__).resolve().parents[2]


def test_parts_are_grouped_per_call():
    events = [("void megalite::cuda::(anonymous namespace)::cached_backward_kernel<float, float, false, 2>", 40.0),
              ("void megalite::cuda::(anonymous namespace)::cached_weight_grad_final_kernel<float, false>", 20.0),
              ("void at::native::vectorized_elementwise_kernel<...>", 4.0)]
    assert parts_of(events, calls=4) == pytest.approx({"row kernel": 10.0, "dweight/dbias reduction": 5.0,
                                                       "other": 1.0})


def test_without_cuda_it_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run is gpu_check.sh's")
    done = subprocess.run([sys.executable, "-m", "benchmarks.norm_backward_parts"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("no CUDA device"), done.stdout + done.stderr
