"""Optional dependencies: import one, or fail with the ``pip install`` that brings it.

Which extra brings a package is read from the installed metadata (pyproject.toml's
``[project.optional-dependencies]``), the one place the extras are listed.

    >>> require("json").__name__
    'json'
"""
from __future__ import annotations

import importlib
import re
from importlib import metadata
from types import ModuleType
from typing import Optional

# 'tqdm; extra == "data"' -> ("tqdm", "data"), as a Requires-Dist line of the package's metadata.
_EXTRA_REQUIREMENT = re.compile(r"""^([A-Za-z0-9._-]+).*;.*extra\s*==\s*["']([^"']+)["']""")


def extra_providing(distribution: str) -> Optional[str]:
    """The megalite extra that installs ``distribution``; None when none does or megalite is not installed."""
    try:
        requirements = metadata.requires("megalite") or []
    except metadata.PackageNotFoundError:
        return None
    wanted = re.sub(r"[-_.]+", "-", distribution).lower()
    for line in requirements:
        match = _EXTRA_REQUIREMENT.match(line)
        if match and re.sub(r"[-_.]+", "-", match.group(1)).lower() == wanted:
            return match.group(2)
    return None


def require(module: str, distribution: Optional[str] = None) -> ModuleType:
    """Import ``module``; if it is missing, raise ImportError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    distribution = distribution or module
    extra = extra_providing(distribution)
    fix = f"pip install 'megalite[{extra}]'" if extra else f"pip install {distribution}"
    raise ImportError(f"{module} is not installed: {fix}")
