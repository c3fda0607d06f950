"""megalite/train.py from outside the checkout: each way of starting the trainer names itself in
--help and in its one-line errors (examples/pretrain_gpt.py's are in tests/training/test_cli_errors.py)."""
import os
import shutil
import subprocess
import sys

import pytest

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "1"]


def run_in(folder, command):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("PYTHONPATH", None)  # megalite must come from the installed package, not the checkout
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env, timeout=120)


def console_script(name):
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install --no-build-isolation -e .)")
    return path


@pytest.mark.parametrize("command, prog", [
    ([sys.executable, "-m", "megalite.train"], "python -m megalite.train"),
    (["megalite-train"], "megalite-train"),
])
def test_help_and_errors_name_the_program(tmp_path, command, prog):
    if command == ["megalite-train"]:
        command = [console_script("megalite-train")]
    helped = run_in(tmp_path, command + ["--help"])
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {prog} ") and "--tensor-model-parallel-size" in helped.stdout
    failed = run_in(tmp_path, command + TINY)
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: --data-path is required"), failed.stderr
