"""The launch scripts as a cluster runs them, on this machine: two torchrun agents (node ranks 0
and 1, rendezvous on 127.0.0.1) train, take a SIGTERM, save, exit 0, and resume; the SLURM script
does the same with ``srun`` and ``scontrol`` replaced by stubs that start one agent per node."""
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", "--vocab-size", "256",
        "--lr-warmup-iters", "0"]


def free_port() -> int:
    """A free port below the kernel's ephemeral range (ip_local_port_range): torchrun binds it
    seconds later, and a port the kernel hands out meanwhile to some connection (gloo opens many)
    would be taken by then."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def environment(out, port, **extra):
    return {**os.environ, "PY": sys.executable, "OUT": str(out), "NPROC_PER_NODE": "1", "NNODES": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}


def logged(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line)["iteration"] for line in open(path)] if os.path.exists(path) else []


def workers_of(pids):
    """The training processes: the children of the torchrun agents among these processes and their
    descendants (the torchrun script runs its agent as a child)."""
    found = []
    for pid in pids:
        agent = b"torch.distributed.run" in open(f"/proc/{pid}/cmdline", "rb").read()
        for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
            found.extend([int(child)] if agent else workers_of([int(child)]))
    return found


def preempt_when_logged(processes, out, iterations):
    deadline = time.time() + 120
    while len(logged(out)) < iterations:
        assert time.time() < deadline and all(p.poll() is None for p in processes), "the run did not get going"
        time.sleep(0.1)
    for pid in workers_of([p.pid for p in processes]):
        os.kill(pid, signal.SIGTERM)
    return [p.wait(timeout=120) for p in processes]


def test_two_torchrun_nodes_take_a_sigterm_save_and_resume(tmp_path):
    out, port = tmp_path / "run", free_port()
    script = os.path.join(ROOT, "examples", "train_gpt2_torchrun.sh")
    agents = [subprocess.Popen(["bash", script, *TINY, "--train-iters", "100000"],
                               env=environment(out, port, NODE_RANK=str(rank)), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for rank in (0, 1)]
    assert preempt_when_logged(agents, out, 3) == [0, 0]
    stopped = logged(out)[-1]
    tracker = os.path.join(out, "checkpoints", "latest_checkpointed_iteration.txt")
    assert int(open(tracker).read()) == stopped
    # Started again, the same command continues where it stopped.
    port = free_port()
    resumed = [subprocess.Popen(["bash", script, *TINY, "--train-iters", str(stopped + 2)],
                                env=environment(out, port, NODE_RANK=str(rank)), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for rank in (0, 1)]
    assert [p.wait(timeout=180) for p in resumed] == [0, 0]
    assert logged(out) == list(range(1, stopped + 3))


def test_slurm_script_with_stub_srun(tmp_path):
    out, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol: the allocation's host names; srun: one task per node, as SLURM would start them.
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" & done\n'
                                  'wait -n; a=$?; wait -n; b=$?; exit $((a | b))\n')
    for stub in ("scontrol", "srun"):
        (bin_dir / stub).chmod((bin_dir / stub).stat().st_mode | stat.S_IEXEC)
    env = environment(out, free_port(), SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]",
                      SLURM_SUBMIT_DIR=ROOT, PATH=f"{bin_dir}:{os.environ['PATH']}")
    job = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "train_gpt2_slurm.sh"), *TINY,
                            "--train-iters", "100000"], env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(logged(out)) < 3:
        assert time.time() < deadline and job.poll() is None, "the job did not get going"
        time.sleep(0.1)
    # SLURM's --signal=TERM@...: every training process of the job gets SIGTERM.
    agents = [int(p) for p in subprocess.run(["pgrep", "-f", "torch.distributed.run"], capture_output=True,
                                            text=True).stdout.split() if os.getpgid(int(p)) == job.pid]
    for pid in workers_of(agents):
        os.kill(pid, signal.SIGTERM)
    assert job.wait(timeout=120) == 0
    stopped = logged(out)[-1]
    assert int(open(os.path.join(out, "checkpoints", "latest_checkpointed_iteration.txt")).read()) == stopped
    # The requeued job resumes.
    env["MASTER_PORT"] = str(free_port())
    again = subprocess.run(["bash", os.path.join(ROOT, "examples", "train_gpt2_slurm.sh"), *TINY, "--train-iters",
                            str(stopped + 1)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert logged(out) == list(range(1, stopped + 2))


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the worker processes")


def test_kill_9_of_one_rank_then_resume_follows_the_uninterrupted_curve(tmp_path):
    script = os.path.join(ROOT, "examples", "train_gpt2_torchrun.sh")
    flags = [*TINY, "--train-iters", "8", "--save-interval", "2"]

    def start(out):
        env = environment(out, free_port(), NNODES="1", NODE_RANK="0", NPROC_PER_NODE="2")
        return subprocess.Popen(["bash", script, *flags], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert start(tmp_path / "straight").wait(timeout=180) == 0
    out = tmp_path / "killed"
    run = start(out)
    deadline = time.time() + 120
    while len(logged(out)) < 5:
        assert time.time() < deadline and run.poll() is None, "the run did not get going"
        time.sleep(0.05)
    os.kill(workers_of([run.pid])[1], signal.SIGKILL)     # one rank dies; torchrun ends the other
    assert run.wait(timeout=120) != 0
    assert start(out).wait(timeout=180) == 0                # the same command resumes
    losses = {json.loads(line)["iteration"]: json.loads(line)["loss"]
              for line in open(os.path.join(out, "log.jsonl"))}
    straight = [json.loads(line)["loss"] for line in open(os.path.join(tmp_path / "straight", "log.jsonl"))]
    assert logged(out) == list(range(1, 9)) and [losses[i] for i in range(1, 9)] == straight
