#!/usr/bin/env python
"""megalite-train with one planted fault, for the launch tests (TRAIN_SCRIPT of the torchrun script).

MEGALITE_TEST_FAULT picks the fault and where it strikes; MEGALITE_TEST_FAULT_ONCE names a file
created just before it strikes, so the same command, run again (or restarted by torchrun), trains
without it:

    kill-after-save:ITER:RANK      RANK is SIGKILLed once iteration ITER's checkpoint is complete; when
                                   torchrun restarts the ranks, RANK joins late, as a slow node would
    kill-before-manifest:ITER      rank 0 is SIGKILLed with every file of ITER durable but no manifest
    kill-mid-files:ITER:RANK       RANK is SIGKILLed after writing its first file of iteration ITER
    missing-data:RANK              RANK alone fails to find its data file during setup (a node without it)
    disk-full:ITER:RANK            RANK alone cannot write its checkpoint files of iteration ITER (ENOSPC)
    none                           no fault; after main() each rank prints the threads it still has,
                                   `[rank N] threads left: <names>` (none should outlive the run)
"""
import errno
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from megalite.checkpoint import save_load as checkpoint
from megalite.train import main
from megalite.training import loop as training


def _strikes() -> bool:
    """True the first time (the marker file does not exist yet), and creates the marker."""
    marker = os.environ["MEGALITE_TEST_FAULT_ONCE"]
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _restart_victim_late(victim: int, rank: int) -> None:
    """The other ranks start to meet first, where the failed attempt's keys are still in torchrun's
    store; the victim joins 5 s later (gloo gives up on a refused address after about 4 s)."""
    marker = os.environ["MEGALITE_TEST_FAULT_ONCE"] + ".meeting"
    if rank != victim:
        init_process_group = dist.init_process_group

        def announce_then_init(*args, **kwargs):
            open(f"{marker}.{rank}", "w").close()
            return init_process_group(*args, **kwargs)
        dist.init_process_group = announce_then_init
        return
    others = [r for r in range(int(os.environ["WORLD_SIZE"])) if r != victim]
    while not all(os.path.exists(f"{marker}.{r}") for r in others):
        time.sleep(0.05)
    time.sleep(5)


def _plant(fault: str) -> None:
    kind, *where = fault.split(":")
    rank = int(os.environ["RANK"])
    if kind == "kill-after-save":
        iteration, victim = int(where[0]), int(where[1])
        if os.path.exists(os.environ["MEGALITE_TEST_FAULT_ONCE"]):
            _restart_victim_late(victim, rank)
        save = training.save

        def save_then_die(run):
            save(run)
            if run.iteration == iteration and rank == victim and _strikes():
                _die()
        training.save = save_then_die
    elif kind == "kill-before-manifest":
        iteration = int(where[0])
        write_manifest = checkpoint.write_manifest

        def die_instead(folder, it, *args, **kwargs):
            if it == iteration and _strikes():
                _die()
            return write_manifest(folder, it, *args, **kwargs)
        checkpoint.write_manifest = die_instead
    elif kind in ("kill-mid-files", "disk-full"):
        iteration, victim = int(where[0]), int(where[1])
        save_file = checkpoint._save

        def faulty_save_file(obj, path):
            in_iteration = f"iter_{iteration:07d}" in path
            if kind == "disk-full" and in_iteration and rank == victim:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            save_file(obj, path)
            if kind == "kill-mid-files" and in_iteration and rank == victim and _strikes():
                _die()
        checkpoint._save = faulty_save_file
    elif kind == "missing-data":
        victim = int(where[0])
        datasets = training.datasets_from_config

        def datasets_or_missing(*args, **kwargs):
            if rank == victim:
                raise FileNotFoundError(f"--data-path /data/shard-{rank}: no such file on this node "
                                        f"(/data/shard-{rank}.bin)")
            return datasets(*args, **kwargs)
        training.datasets_from_config = datasets_or_missing
    elif kind != "none":
        raise SystemExit(f"faulty_train.py: unknown MEGALITE_TEST_FAULT {fault!r}")


if __name__ == "__main__":
    _plant(os.environ["MEGALITE_TEST_FAULT"])
    status = main(prog="pretrain_gpt.py")
    if os.environ["MEGALITE_TEST_FAULT"] == "none":
        others = [open(f"/proc/self/task/{tid}/comm").read().strip()
                  for tid in os.listdir("/proc/self/task") if int(tid) != threading.get_native_id()]
        print(f"[rank {os.environ['RANK']}] threads left: {others}", flush=True)
    sys.exit(status)
