"""pyproject.toml's metadata: console scripts that resolve and name themselves, extras that the
installed package reports, and scripts/missing_requirements.py (what setup_env.sh installs).
The full install into a fresh environment is scripts/check_install.sh (minutes: it compiles)."""
import importlib
import importlib.util
import pathlib
import re
from importlib import metadata

import pytest

from megalite import extras

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_missing_requirements():
    spec = importlib.util.spec_from_file_location("missing_requirements", ROOT / "scripts" / "missing_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


missing_requirements = load_missing_requirements()
with open(ROOT / "pyproject.toml", "rb") as f:
    PYPROJECT = missing_requirements.tomllib.load(f)
SCRIPTS = PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_names_the_script(name, capsys):
    module_name, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module_name), function)
    try:
        code = main(["--help"])
    except SystemExit as exit:
        code = exit.code
    assert code in (0, None)
    assert capsys.readouterr().out.startswith(f"usage: {name} ")


def test_no_code_edits_sys_path():
    """The commands find megalite as an installed package; a sys.path edit would hide a broken install.
    (benchmarks/ are run from a checkout and may put it on the path.)"""
    edit = re.compile(r"sys\.path\.(insert|append)")
    offenders = [str(p.relative_to(ROOT)) for folder in ("megalite", "tools", "examples")
                 for p in sorted((ROOT / folder).rglob("*.py")) if edit.search(p.read_text())]
    assert offenders == []


def fake_pyproject(dependencies, optional=None, build=()):
    return {"build-system": {"requires": list(build)},
            "project": {"name": "megalite", "dependencies": dependencies, "optional-dependencies": optional or {}}}


def test_missing_lists_only_what_is_absent_or_too_old():
    project = fake_pyproject(["numpy", "numpy>=999", "megalite-surely-absent-package"], build=["pytest"])
    assert missing_requirements.missing(project, []) == ["numpy>=999", "megalite-surely-absent-package"]


def test_missing_never_lists_torch(capsys):
    project = fake_pyproject(["torch>=999"])
    assert missing_requirements.missing(project, []) == []
    assert "keeping the installed torch" in capsys.readouterr().err


def test_extras_expand_references_to_megalite():
    project = fake_pyproject([], {"a": ["absent-a"], "b": ["absent-b", "megalite[a]"], "all": ["megalite[b]"]})
    assert sorted(missing_requirements.missing(project, ["all"])) == ["absent-a", "absent-b"]
    with pytest.raises(SystemExit, match="extra 'c' is not in pyproject.toml; choose from a, all, b"):
        missing_requirements.missing(project, ["c"])


def test_the_real_metadata_parses():
    wanted = {r.name for r in missing_requirements.wanted_requirements(PYPROJECT, ["dev"])}
    assert {"torch", "numpy", "pytest", "ruff", "tqdm", "matplotlib"} <= wanted  # dev brings data and plot


def test_installed_metadata_names_each_extra():
    """extras.require's advice comes from the installed metadata: it must match pyproject.toml."""
    try:
        metadata.version("megalite")
    except metadata.PackageNotFoundError:
        pytest.skip("megalite's metadata is not installed here (pip install --no-build-isolation -e .)")
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for line in requirements:
            name = missing_requirements.Requirement(line).name
            if name != "megalite":
                assert extras.extra_providing(name) == extra, name


def test_require_names_the_install_command():
    with pytest.raises(ImportError, match="^megalite_absent is not installed: pip install megalite_absent$"):
        extras.require("megalite_absent")
    assert extras.require("json").__name__ == "json"
