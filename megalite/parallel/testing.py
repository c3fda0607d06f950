"""Run a function on N CPU ranks over gloo: the harness of every multi-rank test.

    def check(rank, world_size, scale):
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return t.item()

    assert run_on_ranks(check, 4, 2.0) == [12.0] * 4

Each rank sets ``torch.set_num_threads(1)`` first (N ranks share the cores, and OpenMP pools do
not survive a fork), rendezvouses through a ``file://`` store in a private temporary folder, runs
the function and sends back its (picklable) result.  If a rank raises, the test fails with that
rank's traceback; if any rank is still running at the deadline, every rank is killed and the test
fails naming the ranks that hung.

How the ranks start (``MEGALITE_RANK_START``, default ``auto``):

- ``fork``: fork the calling process.  Cheap -- milliseconds, where a fresh interpreter importing
  torch costs over a second per rank on a 2-core machine -- but only safe while the caller has
  not started autograd's device threads or CUDA.  On a build that sees an accelerator, the autograd
  engine starts one thread per device on the process's FIRST backward, even a CPU-only one, and a
  child forked after that fails its own first backward ("Unable to handle autograd's threading in
  combination with fork-based multiprocessing"); a child of a process that initialised CUDA cannot
  use CUDA.  torch offers no way to ask whether the threads were started.
- ``forkserver``: ranks are forked from a helper interpreter that ``multiprocessing`` starts with
  ``exec`` on first use and that only imports modules (torch, megalite), so it is clean whatever
  the caller did.  The function and its arguments travel by pickle: they must be module-level
  functions and plain data, and a script that calls run_on_ranks needs the
  ``if __name__ == "__main__":`` guard (each rank imports the caller's main module).  The helper's
  start costs ~3 s once per process, each call ~20 ms more than a fork on a 2-core machine.
- ``auto``: ``fork`` where torch sees no accelerator (the engine then never starts device threads
  and CUDA cannot be initialised), ``forkserver`` otherwise.

Ranks always run on the CPU: accelerators are hidden from every rank started through the fork
server, so a parity test compares float32 CPU ranks against a float32 CPU reference on any machine.
"""
from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional

START_ENV = "MEGALITE_RANK_START"
_START_METHODS = ("auto", "fork", "forkserver")
# Imported once by the fork server so that each rank does not pay for them; with them, every
# megalite module the caller has imported by then (under pytest: all that the collected tests use).
# The fx import is the one autograd does lazily on the first backward through a GradientEdge (~1 s
# per rank otherwise).  Nothing here may initialise CUDA (a child of a process that did cannot use
# it), which is why megalite._cuda, whose kernels ranks never run, is left out.
_SERVER_PRELOAD = ["torch", "torch.distributed", "torch.fx.experimental.symbolic_shapes", "numpy", "pytest",
                   "megalite.parallel.testing", "megalite.training.loop"]


# After one rank fails, how long the others get to finish (and report their own errors).
_FAILURE_GRACE_S = 2.0


class RankFailed(RuntimeError):
    pass


class RanksHung(TimeoutError):
    pass


def _accelerator_present() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def rank_start_method() -> str:
    """'fork' or 'forkserver': how :func:`run_on_ranks` starts ranks in this process now."""
    choice = os.environ.get(START_ENV, "auto").strip().lower() or "auto"
    if choice not in _START_METHODS:
        raise ValueError(f"{START_ENV}={choice!r} is not one of {_START_METHODS}; unset it to let megalite choose")
    if choice != "auto":
        return choice
    return "forkserver" if _accelerator_present() else "fork"


def _child(fn, rank, world_size, store_path, result_path, timeout_s, args, kwargs, environ: Optional[dict]):
    if environ is not None:
        # A fork-server child inherits the server's environment, not the caller's: give it the
        # caller's (a test may have set MEGALITE_KERNELS, say), and no accelerator (module doc).
        os.environ.clear()
        os.environ.update(environ)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    status = 1
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = ("ok", fn(rank, world_size, *args, **kwargs))
        finally:
            # The grid's groups, then the default one.  On torch 2.4 after a GIL-releasing pause: its gloo
            # destructor can hang on a worker thread (parallel/launch.py shut_down_distributed; a rank of
            # the calibration test hung there once, after its last collective).  Not paid on newer torch,
            # where no such hang has been seen, as the suite forks ranks hundreds of times.
            from torch.torch_version import TorchVersion

            from megalite.parallel.launch import shut_down_distributed
            shut_down_distributed(pause=TorchVersion(torch.__version__) < (2, 5))
        status = 0
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = ("error", traceback.format_exc())
    try:
        with open(result_path + ".part", "wb") as f:
            pickle.dump(result, f)
        os.replace(result_path + ".part", result_path)
    except Exception:  # unpicklable result
        with open(result_path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        status = 1
    os._exit(status)


def _context(method: str):
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        imported = sorted(name for name in sys.modules if name.startswith("megalite.") and name != "megalite._cuda")
        context.set_forkserver_preload(_SERVER_PRELOAD + imported)  # read when the server starts, once
    return context


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0, **kwargs) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the list of the ranks' return values, in rank order.  Collectives inside get a timeout
    of ``timeout`` seconds too, so a rank stuck in one fails with gloo's error rather than a hang.
    """
    method = rank_start_method()
    context = _context(method)
    environ = dict(os.environ) if method == "forkserver" else None
    workdir = tempfile.mkdtemp(prefix="megalite-ranks-")
    ranks = []
    try:
        for rank in range(world_size):
            ranks.append(_start_rank(context, method, fn, rank, world_size, workdir, timeout, args, kwargs, environ))
        exit_codes = _wait_for_ranks(ranks, timeout)
        return _collect_results(workdir, world_size, exit_codes)
    finally:
        _clean_up(ranks, workdir)


def _result_path(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"result-{rank}.pkl")


def _start_rank(context, method: str, fn, rank: int, world_size: int, workdir: str, timeout: float, args, kwargs,
                environ: Optional[dict]):
    """The started process of one rank; a function or arguments that cannot travel to it is a TypeError."""
    process = context.Process(target=_child, name=f"megalite-rank-{rank}",
                              args=(fn, rank, world_size, os.path.join(workdir, "rendezvous"),
                                    _result_path(workdir, rank), timeout, args, kwargs, environ))
    try:
        process.start()
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(f"run_on_ranks: {getattr(fn, '__qualname__', fn)!r} or its arguments cannot be "
                        f"pickled for {START_ENV}={method} ({error}); define the function at module "
                        f"level and pass plain data") from error
    return process


def _wait_for_ranks(ranks, timeout: float) -> dict:
    """rank -> exit code of the ranks that finished: all of them, or those done when the grace after a
    failure ran out.  RanksHung when the deadline passes first."""
    world_size = len(ranks)
    deadline = time.monotonic() + timeout
    grace_deadline = None
    exit_codes = {}
    while True:
        for rank, process in enumerate(ranks):
            if rank not in exit_codes and process.exitcode is not None:
                exit_codes[rank] = process.exitcode
        if len(exit_codes) == world_size:
            return exit_codes
        now = time.monotonic()
        if grace_deadline is None and any(code != 0 for code in exit_codes.values()):
            # A rank failed.  Its peers either fail soon after (gloo sees the peer gone) -- wait
            # for them, or the first traceback read could be a peer's echo of the failure
            # rather than its cause -- or wait in a collective until its timeout: not that long.
            grace_deadline = now + _FAILURE_GRACE_S
        if grace_deadline is not None and now >= grace_deadline:
            return exit_codes
        if now >= deadline:
            hung = sorted(set(range(world_size)) - set(exit_codes))
            raise RanksHung(f"rank(s) {hung} of {world_size} did not finish within {timeout:.0f} s "
                            f"(finished: {sorted(exit_codes)})")
        running = [process.sentinel for rank, process in enumerate(ranks) if rank not in exit_codes]
        multiprocessing.connection.wait(running, timeout=max(0.0, min(deadline, grace_deadline or deadline) - now))


def _collect_results(workdir: str, world_size: int, exit_codes: dict) -> List[Any]:
    """The ranks' return values in rank order; RankFailed with every failed rank's traceback or exit."""
    results, errors = [], []
    for rank in range(world_size):
        path = _result_path(workdir, rank)
        if not os.path.exists(path):
            if rank in exit_codes:
                errors.append(f"--- rank {rank} exited with status {exit_codes[rank]} and no result")
            results.append(None)
            continue
        with open(path, "rb") as f:
            kind, value = pickle.load(f)
        if kind == "error":
            errors.append(f"--- rank {rank} raised:\n{value}")
            results.append(None)
        else:
            results.append(value)
    if errors:
        raise RankFailed(f"{len(errors)} of {world_size} ranks failed\n" + "\n".join(errors))
    return results


def _clean_up(ranks, workdir: str) -> None:
    """Kill the ranks still running, reap them all and remove their files."""
    for process in ranks:
        if process.exitcode is None:
            process.kill()
        process.join()
        process.close()
    shutil.rmtree(workdir, ignore_errors=True)


def saved_activation_bytes(module, x):
    """Bytes autograd keeps for the backward of ``module(x)`` (its activations): each storage counted
    once (a saved view keeps its whole storage alive), the module's own parameters left out."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.backward(torch.ones_like(y))
    return sum(saved.values())
