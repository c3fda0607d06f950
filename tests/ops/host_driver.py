"""Builds a test driver that includes one of csrc/cuda's host-only headers (launch_plan.h,
chunk_plan.h: plain C++, no CUDA) with the host compiler, so their decisions are checked on a machine
without a GPU.  Skips the test where no C++ compiler is installed."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def build(driver: str, out_dir: pathlib.Path) -> pathlib.Path:
    """tests/ops/<driver> compiled against csrc/ with warnings as errors; returns the binary."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    binary = out_dir / pathlib.Path(driver).stem
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests/ops" / driver), "-o", str(binary)], check=True)
    return binary
