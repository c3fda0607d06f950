"""Print, one a line, the requirements of pyproject.toml that this Python does not satisfy yet.

    python scripts/missing_requirements.py pyproject.toml data,plot,dev

Reads [build-system].requires (pip does not install them under --no-build-isolation),
[project].dependencies and the named extras (an extra may name others, as ``megalite[data]``).
torch is never printed: a torch that is present is kept whatever its version (a GPU machine's
CUDA build must not be replaced; the CPU pin is setup_env.sh's job), and an old one is reported on
stderr.  Runs before megalite is installed, on any Python >= 3.9 with pip, offline: tomllib, else
tomli, else pip's own copy of it; packaging, else pip's own copy.
"""
from __future__ import annotations

import sys
from importlib import metadata

try:
    import tomllib
except ImportError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ImportError:
        from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

KEPT_AS_INSTALLED = {"torch"}


def wanted_requirements(pyproject: dict, extras) -> list[Requirement]:
    """The build requirements, the dependencies and the extras' requirements, self-references expanded."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    name = canonicalize_name(project["name"])
    found, pending, seen = [], list(extras), set()
    for line in pyproject.get("build-system", {}).get("requires", []) + project.get("dependencies", []):
        found.append(Requirement(line))
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"missing_requirements: extra {extra!r} is not in pyproject.toml; "
                             f"choose from {', '.join(sorted(optional))}")
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == name:
                pending += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


def is_satisfied(requirement: Requirement) -> bool:
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def missing(pyproject: dict, extras) -> list[str]:
    out = []
    for requirement in wanted_requirements(pyproject, extras):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if canonicalize_name(requirement.name) in KEPT_AS_INSTALLED:
            if not is_satisfied(requirement) and _installed(requirement.name):
                print(f"missing_requirements: keeping the installed {requirement.name} "
                      f"{metadata.version(requirement.name)} although megalite asks for {requirement}",
                      file=sys.stderr)
            continue
        if not is_satisfied(requirement) and str(requirement) not in out:
            out.append(str(requirement))
    return out


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main(argv) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    extras = [e for e in (argv[1].split(",") if len(argv) == 2 else []) if e]
    for requirement in missing(pyproject, extras):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
