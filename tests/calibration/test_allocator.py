"""megalite/calibration/allocator.py: glibc's mmap threshold read from the environment, refused in one
line when glibc would ignore it, and fixed in a process (checked in a child, whose allocator the test
may change)."""
import subprocess
import sys

import pytest

from megalite.calibration.allocator import ENV, MAX_THRESHOLD, threshold_from_env


def test_the_threshold_is_read_from_the_environment():
    assert threshold_from_env({}) is None and threshold_from_env({ENV: ""}) is None
    assert threshold_from_env({ENV: "131072"}) == 131072
    assert threshold_from_env({ENV: str(MAX_THRESHOLD)}) == MAX_THRESHOLD


@pytest.mark.parametrize("value", ["128k", "-1", str(MAX_THRESHOLD + 1)])
def test_a_threshold_glibc_would_ignore_is_one_line(value):
    with pytest.raises(ValueError) as error:
        threshold_from_env({ENV: value})
    assert ENV in str(error.value) and value.lstrip("-") in str(error.value) and "\n" not in str(error.value)


def test_fix_threshold_sets_the_process_and_its_children():
    # After fix_threshold, a child started by this process sees the variable; mallopt accepted the value
    # (fix_threshold raises otherwise) and refuses one glibc would not take.
    script = ("import os, subprocess, sys\n"
              "from megalite.calibration.allocator import fix_threshold, ENV\n"
              "fix_threshold(131072)\n"
              "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"%s\"])'],\n"
              "                       capture_output=True, text=True, check=True)\n"
              "print(child.stdout.strip())\n"
              "try:\n"
              "    fix_threshold(%d)\n"
              "except ValueError as error:\n"
              "    print(error)\n" % (ENV, MAX_THRESHOLD + 1))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "131072"
    assert lines[1].startswith(f"--malloc-mmap-threshold {MAX_THRESHOLD + 1}: glibc's mmap threshold is 0 to")
