"""Start torch.distributed for a run: under torchrun/SLURM (env://) or as a lone process.

Collectives get a timeout (``--distributed-timeout-minutes``), so a rank that waits for a peer
that never comes fails with an error instead of hanging forever.
"""
from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile

import torch
import torch.distributed as dist


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """Initialize the default process group once; a no-op when it already is."""
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    else:
        # A single process: a file store in a private folder avoids picking a TCP port.
        folder = tempfile.mkdtemp(prefix="megalite-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # nothing of the run stays in /tmp
        store = os.path.join(folder, "rendezvous")
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
