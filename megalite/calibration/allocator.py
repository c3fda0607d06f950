"""glibc's mmap threshold: the allocator setting a CPU calibration is taken under, and its runs must share.

A CPU rank's peak resident set depends on how glibc's malloc hands back freed memory
(docs/scaling.md, "Peak memory"). By default a block of 128 KiB or more is mapped on its own and
unmapped when freed, but each such free raises the threshold to that block's size (up to 32 MiB), and
from then on blocks of that size come from the heap and stay resident when freed. With the threshold
fixed (``MALLOC_MMAP_THRESHOLD_``, glibc's environment variable, or ``mallopt(M_MMAP_THRESHOLD)``) every
block at or above it is returned when freed, so the peak follows the live bytes the planner counts --
at the price of mapping and faulting in those blocks again on every step, which the calibration sees
only when it is taken under the same setting. So the calibration records the setting, and the sweep
runs under the setting its calibration was taken with.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping, Optional

__all__ = ["ENV", "MAX_THRESHOLD", "threshold_from_env", "check_threshold", "fix_threshold", "plan_note"]

ENV = "MALLOC_MMAP_THRESHOLD_"
# glibc refuses a threshold above HEAP_MAX_SIZE / 2: 32 MiB on a 64-bit machine.
MAX_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3      # mallopt's parameter number (malloc.h)


def check_threshold(nbytes: int, source: str) -> int:
    """``nbytes`` if glibc accepts it as a fixed mmap threshold, else a one-line ValueError naming ``source``."""
    if not 0 <= nbytes <= MAX_THRESHOLD:
        raise ValueError(f"{source} {nbytes}: glibc's mmap threshold is 0 to {MAX_THRESHOLD} bytes "
                         f"(131072, its default start, returns every block of 128 KiB or more)")
    return nbytes


def threshold_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The fixed mmap threshold ``environ`` (default this process's) gives glibc, or None: glibc's default."""
    value = (os.environ if environ is None else environ).get(ENV)
    if value is None or value == "":
        return None
    try:
        nbytes = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: give a size in bytes, e.g. {ENV}=131072") from None
    return check_threshold(nbytes, ENV)


def fix_threshold(nbytes: int) -> None:
    """Fix the mmap threshold at ``nbytes`` in this process (``mallopt``) and in the processes it starts
    (``MALLOC_MMAP_THRESHOLD_``), so a calibration taken here runs as the sweep's ranks will."""
    check_threshold(nbytes, "--malloc-mmap-threshold")
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt") or libc.mallopt(_M_MMAP_THRESHOLD, nbytes) != 1:
        raise ValueError(f"--malloc-mmap-threshold {nbytes}: this C library has no glibc mallopt; "
                         f"leave the flag out here")
    os.environ[ENV] = str(nbytes)


def plan_note(threshold: Optional[int]) -> str:
    """The line megalite-plan prints under a CPU calibration's prediction: which allocator setting its step
    times and peak hold for (the calibration's ``malloc_mmap_threshold``; docs/scaling.md, "Peak memory")."""
    if threshold is None:
        return ("note: this calibration ran with glibc's default allocator, which keeps freed blocks resident: "
                "a rank's peak can exceed the memory above (up to 1.41x measured, docs/scaling.md \"Peak memory\"); "
                f"for a peak that follows it, calibrate and run with {ENV}=524288")
    return f"note: this calibration ran with {ENV}={threshold}: the step times and peak hold for runs with the same"
