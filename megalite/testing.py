"""Run a function on N forked CPU ranks over gloo: the harness of every multi-rank test.

Forking is what makes it fast: spawning a fresh interpreter that imports torch costs over a second
per rank on a 2-core machine, a fork costs milliseconds.  Each child sets
``torch.set_num_threads(1)`` first (N ranks share the cores, and OpenMP pools do not survive a
fork), rendezvouses through a ``file://`` store in a private temporary folder, runs the function
and sends back its (picklable) result.  If a rank raises, the test fails with that rank's
traceback; if any rank is still running at the deadline, every rank is killed and the test fails
naming the ranks that hung.

    def check(rank, world_size, scale):
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return t.item()

    assert run_on_ranks(check, 4, 2.0) == [12.0] * 4
"""
from __future__ import annotations

import datetime
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from typing import Any, Callable, List


class RankFailed(RuntimeError):
    pass


class RanksHung(TimeoutError):
    pass


def _child(fn, rank, world_size, store_path, result_path, timeout_s, args, kwargs):
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
            from megalite.parallel import state
            state.destroy_grid()
            dist.destroy_process_group()
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


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0, **kwargs) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked gloo ranks.

    Returns the list of the ranks' return values, in rank order.  Collectives inside get a timeout
    of ``timeout`` seconds too, so a rank stuck in one fails with gloo's error rather than a hang.
    """
    workdir = tempfile.mkdtemp(prefix="megalite-ranks-")
    store_path = os.path.join(workdir, "rendezvous")
    pids = {}
    try:
        for rank in range(world_size):
            result_path = os.path.join(workdir, f"result-{rank}.pkl")
            pid = os.fork()
            if pid == 0:  # child
                try:
                    _child(fn, rank, world_size, store_path, result_path, timeout, args, kwargs)
                finally:
                    os._exit(1)
            pids[pid] = rank

        deadline = time.monotonic() + timeout
        exit_codes = {}
        while len(exit_codes) < world_size:
            for pid, rank in pids.items():
                if rank in exit_codes:
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exit_codes[rank] = status
            failed = [r for r, status in exit_codes.items() if status != 0]
            if failed:
                # One rank failed: its peers would only wait for it until their collective timeout.
                time.sleep(0.2)
                break
            if time.monotonic() > deadline:
                hung = sorted(set(range(world_size)) - set(exit_codes))
                raise RanksHung(f"rank(s) {hung} of {world_size} did not finish within {timeout:.0f} s "
                                f"(finished: {sorted(exit_codes)})")
            time.sleep(0.005)

        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(workdir, f"result-{rank}.pkl")
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
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
