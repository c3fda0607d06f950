"""What makes a saved iteration trustworthy: durable files, a manifest with a checksum per file
written last, and the tracker moved only after it.

    iter_0000010/manifest.json   {"run_id": ..., "iteration": 10,
                                  "files": {"mp_rank_00_000/model_optim_rng.pt": {"bytes": ..., "crc32": ...}, ...}}

An iteration folder without a manifest was interrupted while saving (or predates manifests).
Loading checks every file a rank reads against the manifest, so a missing, truncated or corrupt file
is one line naming it and the fault, on the rank that found it.  ``run_id`` is drawn when a run
starts fresh and kept across resumes: a save never replaces an iteration another run wrote.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import zlib
from typing import Dict, List, Optional

__all__ = ["CheckpointError", "MANIFEST", "durable_write", "fsync_dir", "file_entry", "write_manifest",
           "read_manifest", "verify_file", "complete_iterations", "new_run_id"]

MANIFEST = "manifest.json"
_ITERATION = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (missing, truncated, corrupt, another run's)."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a created or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: str, write) -> None:
    """``write(file)`` into ``path + '.tmp'``, fsync it, rename it over ``path`` and fsync the folder:
    after a crash the path holds either the old file or the whole new one."""
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "crc32": _crc32(path)}


def write_manifest(iteration_folder: str, iteration: int, run_id: str, files: Dict[str, dict]) -> None:
    manifest = {"run_id": run_id, "iteration": iteration, "files": dict(sorted(files.items()))}
    durable_write(os.path.join(iteration_folder, MANIFEST),
                  lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def read_manifest(iteration_folder: str) -> Optional[dict]:
    """The folder's manifest, or None when it has none (an interrupted save; reader.py refuses to read one)."""
    path = os.path.join(iteration_folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); the save that wrote it was interrupted or the "
                              f"file was damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a megalite checkpoint manifest")
    for relative, entry in manifest["files"].items():
        if not _is_entry(entry):
            raise CheckpointError(f"{path}: the entry of {relative} is {entry!r}, not {{\"bytes\": N, \"crc32\": N}}; "
                                  f"the manifest was damaged, so this iteration cannot be verified")
    return manifest


def _is_entry(entry) -> bool:
    def count(value, limit):
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit
    return isinstance(entry, dict) and count(entry.get("bytes"), 1 << 63) and count(entry.get("crc32"), 1 << 32)


def verify_file(iteration_folder: str, relative: str, manifest: dict) -> str:
    """The file's path once it is known whole; a CheckpointError naming the file and the fault if not."""
    path = os.path.join(iteration_folder, relative)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    expected = manifest["files"].get(relative)
    if expected is None:
        raise CheckpointError(f"checkpoint file {path} is not in {os.path.join(iteration_folder, MANIFEST)}; "
                              f"it was not written by the save that made this iteration")
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint file {path} is truncated: {size} bytes, the manifest says "
                              f"{expected['bytes']}")
    if _crc32(path) != expected["crc32"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its CRC-32 does not match the manifest")
    return path


def complete_iterations(root: str) -> List[int]:
    """Iterations under ``root`` whose save finished (they have a manifest), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITERATION.match(name)
        if match and os.path.isfile(os.path.join(root, name, MANIFEST)):
            found.append(int(match.group(1)))
    return sorted(found)
