"""Index arrays cached as .npy files under a hash of the settings that produced them.

The first process to need an index builds it while holding an exclusive lock on
``<cache_dir>/<hash>.lock``; every other process (other ranks, later runs) waits on the lock,
then memory-maps the finished files.  A ``<hash>-description.json`` written last marks the set as
complete, so a crash mid-write never leaves a half index that looks finished.  A file lock rather
than a collective keeps this correct whichever ranks happen to build datasets.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os

import numpy as np


def settings_hash(settings: dict, source_files=()) -> tuple[str, str]:
    """(hash, description): the settings plus size and mtime of each source file, as JSON."""
    described = dict(settings)
    described["sources"] = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in source_files]
    description = json.dumps(described, indent=2, sort_keys=True)
    return hashlib.md5(description.encode()).hexdigest(), description


def cached_indices(cache_dir: str | None, settings: dict, source_files, build, names):
    """Return ``build()`` (a tuple of arrays named ``names``), from the cache when present."""
    if cache_dir is None:
        return build()
    key, description = settings_hash(settings, source_files)
    paths = [os.path.join(cache_dir, f"{key}-{name}.npy") for name in names]
    done = os.path.join(cache_dir, f"{key}-description.json")
    if not os.path.exists(done):
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, f"{key}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not os.path.exists(done):
                for path, array in zip(paths, build()):
                    partial = path + f".{os.getpid()}.partial.npy"
                    np.save(partial, array)
                    os.replace(partial, path)
                partial = done + f".{os.getpid()}.partial"
                with open(partial, "w") as f:
                    f.write(description)
                os.replace(partial, done)
    return tuple(np.load(path, mmap_mode="r") for path in paths)
