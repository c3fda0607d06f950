"""Compare this Python's installed packages with a lock file (requirements/cpu.txt, made by
scripts/lock.sh): print, one a line, each pin the environment does not meet.

    python scripts/lock_status.py requirements/cpu.txt              # name==version, ready for pip
    python scripts/lock_status.py requirements/cpu.txt --explain    # name: installed X, lock Y
    python scripts/lock_status.py requirements/cpu.txt --skip torch # leave a preinstalled torch out

Runs before megalite is installed, on any Python >= 3.9 with pip, offline: packaging, else pip's
own copy of it.  Exit status 0 whatever it finds; 2 when the lock cannot be read.
"""
from __future__ import annotations

import argparse
import sys
from importlib import metadata

try:
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version


def read_lock(path: str) -> dict[str, str]:
    """{canonical name: pinned version} of a pip-compile output; comments and options skipped."""
    pins = {}
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise ValueError(f"{path}:{number}: '{line}' is not a name==version pin; "
                                 f"refresh the lock with: bash scripts/lock.sh")
            pins[canonicalize_name(name.split(";")[0].strip())] = version.split(";")[0].strip()
    return pins


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def same_version(installed: str, pinned: str) -> bool:
    try:
        return Version(installed) == Version(pinned)
    except InvalidVersion:
        return installed == pinned


def unmet(pins: dict[str, str], skip=()) -> list[tuple[str, str, str | None]]:
    """(name, pinned, installed or None) for each pin not met, in the lock's order."""
    skipped = {canonicalize_name(name) for name in skip}
    out = []
    for name, pinned in pins.items():
        if name in skipped:
            continue
        installed = installed_version(name)
        if installed is None or not same_version(installed, pinned):
            out.append((name, pinned, installed))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock")
    parser.add_argument("--explain", action="store_true", help="name: installed X, lock Y")
    parser.add_argument("--skip", action="append", default=[], help="a package to leave out (repeatable)")
    args = parser.parse_args(argv)
    try:
        pins = read_lock(args.lock)
    except (OSError, ValueError) as error:
        print(f"lock_status: {error}", file=sys.stderr)
        return 2
    for name, pinned, installed in unmet(pins, args.skip):
        if args.explain:
            print(f"{name}: installed {installed or 'nothing'}, lock {pinned}")
        else:
            print(f"{name}=={pinned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
