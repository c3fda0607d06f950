"""Start torch.distributed for a run: under torchrun/SLURM (env://) or as a lone process.

Collectives get a timeout (``--distributed-timeout-minutes``), so a rank that waits for a peer
that never comes fails with an error instead of hanging forever.

Restarts (``torchrun --max-restarts``): the workers meet in the store of torchrun's agent, which
outlives a restart, and the keys of the attempt that failed stay in it -- among them each rank's
gloo/NCCL address.  A restarted rank that reads a peer's key before the restarted peer rewrites it
connects to a dead process and waits out the timeout.  So each attempt meets under its own prefix,
``megalite/attempt<TORCHELASTIC_RESTART_COUNT>/``.
"""
from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from megalite.parallel import state


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _store_of_this_attempt(world_size: int, timeout: datetime.timedelta):
    """torchrun's agent store, under a prefix of this restart attempt; None (env://) outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"megalite/attempt{attempt}/", store)


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
        dist.init_process_group(backend, store=_store_of_this_attempt(world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
    else:
        # A single process: a file store in a private folder avoids picking a TCP port.
        folder = tempfile.mkdtemp(prefix="megalite-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # nothing of the run stays in /tmp
        store = os.path.join(folder, "rendezvous")
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)


def shut_down_distributed(destroy_default: bool = True, pause: bool = True) -> None:
    """Destroy the grid's groups, then (``destroy_default``) the default group.

    First (``pause``) the main thread sleeps a moment, which releases the GIL: a gloo worker thread may still be
    releasing the tensors of a collective that has just completed, and dropping a tensor Python has
    seen takes the GIL.  torch 2.4's ProcessGroupGloo destructor joins those threads while the thread
    destroying the group holds the GIL, so a worker caught there waits forever: the main thread in
    ``~ProcessGroupGloo`` -> ``thread::join``, the worker in ``PyObjectSlot::~PyObjectSlot`` ->
    ``gil_scoped_acquire``.
    """
    if pause and dist.is_initialized():
        time.sleep(0.1)
    state.destroy_grid()
    if destroy_default and dist.is_initialized():
        dist.destroy_process_group()
