"""An elastic job that comes back with fewer ranks: torchrun (``--nnodes 1:2``, c10d rendezvous)
runs ``megalite-train`` on 2 ranks (DP=2, ZeRO-1), saving at iterations 2 and 4; the same command
on 1 rank resumes from iteration 2 at DP=1 (the checkpoint is resharded) and follows the 2-rank
run's loss curve."""
import json
import os
import socket
import subprocess
import sys

import torch

from megalite.checkpoint import paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "64", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "4",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "1000",
         "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--use-distributed-optimizer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv, cwd) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               "--rdzv-conf", "last_call_timeout=1", "-m", "megalite.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(path):
    return [(r["iteration"], r["loss"]) for r in map(json.loads, open(path))]


def test_torchrun_with_fewer_ranks_resumes_the_newest_checkpoint_at_its_new_layout(tmp_path):
    save = str(tmp_path / "ckpt")
    _torchrun(2, FLAGS + ["--save", save, "--save-interval", "2", "--log-json", str(tmp_path / "two.jsonl")],
              tmp_path)
    straight = _losses(tmp_path / "two.jsonl")
    assert [i for i, _ in straight] == [1, 2, 3, 4]
    # The job lost a node after iteration 2: its newest checkpoint is iteration 2.
    with open(os.path.join(save, paths.TRACKER_FILE), "w") as f:
        f.write("2")
    _torchrun(1, FLAGS + ["--load", save, "--save", str(tmp_path / "after"), "--log-json",
                          str(tmp_path / "one.jsonl")], tmp_path)
    resumed = _losses(tmp_path / "one.jsonl")
    assert [i for i, _ in resumed] == [3, 4]
    # float32 round-off: DP=1 accumulates the 4 micro-batches in another order than DP=2's average.
    torch.testing.assert_close(torch.tensor([loss for _, loss in resumed]),
                               torch.tensor([loss for _, loss in straight[2:]]), rtol=1e-5, atol=0)
