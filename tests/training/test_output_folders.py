"""An output folder the run could not write is refused in one line before any work: --save naming a file,
a folder on a read-only file system or without permission (checked with os.access, nothing written)."""
import os
import subprocess
import sys

import pytest

from megalite.config.settings import TrainingConfig
from megalite.training.arguments import check_output_folders

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--eval-iters", "0"]


def test_save_naming_a_file_is_one_line_from_the_command(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a folder")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "megalite.train", *TINY, "--save", str(target)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(f"--save {target}: {target} is a file, not a folder; name a folder")


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)      # as a read-only file system answers
    with pytest.raises(ValueError, match=f"^--tensorboard-dir {tmp_path}/tb/run: {tmp_path} cannot be written"):
        check_output_folders(TrainingConfig(tensorboard_dir=str(tmp_path / "tb" / "run")))
    check_output_folders(TrainingConfig())       # no output folder: nothing to check


def test_a_file_in_the_way_of_a_log_folder_is_named(tmp_path):
    (tmp_path / "logs").write_text("")
    with pytest.raises(ValueError, match=f"^--log-json {tmp_path}/logs/run.jsonl: {tmp_path}/logs is a file, not a "
                                         f"folder"):
        check_output_folders(TrainingConfig(log_json=str(tmp_path / "logs" / "run.jsonl")))


def test_log_json_naming_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"^--log-json {tmp_path} is a folder; name the file"):
        check_output_folders(TrainingConfig(log_json=str(tmp_path)))
