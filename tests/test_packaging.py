"""pyproject.toml's metadata: console scripts that resolve and name themselves, extras that the
installed package reports, the lock requirements/cpu.txt and scripts/lock_status.py (what setup_env.sh installs), and
no script folder that shadows an installed distribution or edits sys.path.
The full install into a fresh environment is scripts/check_install.sh (minutes: it compiles)."""
import importlib
import importlib.util
import pathlib
import re
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from megalite import extras

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_lock_status():
    spec = importlib.util.spec_from_file_location("lock_status", ROOT / "scripts" / "lock_status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_status = load_lock_status()
with open(ROOT / "pyproject.toml", "rb") as f:
    PYPROJECT = tomllib.load(f)
LOCK = ROOT / "requirements" / "cpu.txt"
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


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[[^]]*\]\s*=|\s*[+]?=)")
SCRIPT_FOLDERS = ("benchmarks", "tools", "scripts", "examples")


def test_no_code_edits_sys_path():
    """The commands find megalite as an installed package, and benchmarks/ and tools/ are packages run with
    ``python -m``: a sys.path edit would hide a broken install, or leave a folder on the path for the tests that
    run after it (where a module of that folder then shadows an installed distribution).  Tests that need a
    path use pytest's monkeypatch, which undoes it."""
    # The guard (tests/conftest.py puts back what a test changed) and the tests that spell edits out to test it.
    guards = {pathlib.Path(__file__).resolve(), ROOT / "tests" / "conftest.py",
              ROOT / "tests" / "test_sys_path_guard.py"}
    offenders = [str(p.relative_to(ROOT)) for folder in ("megalite", "tests") + SCRIPT_FOLDERS
                 for p in sorted((ROOT / folder).rglob("*.py"))
                 if p not in guards and SYS_PATH_EDIT.search(p.read_text())]
    assert offenders == []


def test_the_sys_path_edit_pattern_sees_each_spelling():
    for line in ["sys.path.insert(0, ROOT)", "sys.path.append(x)", "sys.path[:0] = [x]", "sys.path = [x]",
                 "sys.path += [x]", "sys.path.remove(x)"]:
        assert SYS_PATH_EDIT.search(line), line
    assert not SYS_PATH_EDIT.search("print(sys.path)") and not SYS_PATH_EDIT.search("list(sys.path) == before")


def import_names_under(folder: pathlib.Path):
    """{top-level import name: file} of what running a script of ``folder`` (or ``python -m`` from the root) can
    import: the folder's own name, and each module and package inside it, at every depth (a script puts its own
    folder first on sys.path)."""
    names = {folder.name: folder}
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" not in path.parts:
            names.setdefault(path.stem, path) if path.stem != "__init__" else names.setdefault(path.parent.name, path)
    return names


def test_no_script_module_shadows_an_installed_distribution():
    """A module of benchmarks/, tools/, scripts/ or examples/ named like an installed distribution's top-level
    package is found first whenever its folder is on sys.path (``python benchmarks/kernels.py`` hid the
    ``kernels`` package that transformers imports)."""
    installed = metadata.packages_distributions()
    clashes = [f"{path.relative_to(ROOT)} is '{name}', the import name of {', '.join(installed[name])}"
               for folder in SCRIPT_FOLDERS for name, path in import_names_under(ROOT / folder).items()
               if name in installed]
    assert clashes == []


def test_the_shadow_check_sees_a_clash(tmp_path):
    (tmp_path / "benchmarks" / "deep").mkdir(parents=True)
    (tmp_path / "benchmarks" / "pytest.py").write_text("")
    (tmp_path / "benchmarks" / "deep" / "__init__.py").write_text("")
    names = import_names_under(tmp_path / "benchmarks")
    assert set(names) == {"benchmarks", "pytest", "deep"}
    assert "pytest" in metadata.packages_distributions()


def test_the_lock_pins_every_requirement_of_pyproject():
    """requirements/cpu.txt is made from pyproject.toml (bash scripts/lock.sh): a requirement added or tightened
    there without re-locking fails here."""
    pins = lock_status.read_lock(str(LOCK))
    project = PYPROJECT["project"]
    lines = PYPROJECT["build-system"]["requires"] + project["dependencies"]
    lines += [line for extra in project["optional-dependencies"].values() for line in extra]
    problems = []
    for line in lines:
        requirement = Requirement(line)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{line}: lock has {pinned}")
    assert problems == []
    assert pins["torch"].startswith("2.13.0")


def test_lock_status_lists_what_is_absent_or_another_version(tmp_path):
    lock = tmp_path / "lock.txt"
    pytest_version = metadata.version("pytest")
    lock.write_text(f"pytest=={pytest_version}\n    # via megalite\nnumpy==0.0.1\n"
                    "megalite-surely-absent-package==1.0\n")
    pins = lock_status.read_lock(str(lock))
    assert lock_status.unmet(pins) == [("numpy", "0.0.1", metadata.version("numpy")),
                                       ("megalite-surely-absent-package", "1.0", None)]
    assert lock_status.unmet(pins, skip=["NumPy"]) == [("megalite-surely-absent-package", "1.0", None)]


def test_lock_status_refuses_a_line_that_is_not_a_pin(tmp_path, capsys):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy>=1\n")
    assert lock_status.main([str(lock)]) == 2
    assert capsys.readouterr().err.strip() == (f"lock_status: {lock}:1: 'numpy>=1' is not a name==version pin; "
                                               "refresh the lock with: bash scripts/lock.sh")


def test_installed_metadata_names_each_extra():
    """extras.require's advice comes from the installed metadata: it must match pyproject.toml."""
    try:
        metadata.version("megalite")
    except metadata.PackageNotFoundError:
        pytest.skip("megalite's metadata is not installed here (pip install --no-build-isolation -e .)")
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for line in requirements:
            name = Requirement(line).name
            if name != "megalite":
                assert extras.extra_providing(name) == extra, name


def test_require_names_the_install_command():
    with pytest.raises(ImportError, match="^megalite_absent is not installed: pip install megalite_absent$"):
        extras.require("megalite_absent")
    assert extras.require("json").__name__ == "json"


def setup_helpers():
    """setup.py's functions, without running setup() (the module's last lines)."""
    source = (ROOT / "setup.py").read_text().split("ext_modules, cmdclass = extensions()")[0]
    namespace = {"__file__": str(ROOT / "setup.py")}
    saved = list(sys.path)
    try:
        exec(compile(source, "setup.py", "exec"), namespace)
    finally:   # importing setuptools puts its _vendor folder on sys.path
        sys.path[:] = saved
    return namespace


@pytest.mark.parametrize("with_package", [True, False])
def test_setup_finds_pybind11_headers_with_or_without_the_package(monkeypatch, with_package):
    """megalite._data needs pybind11's headers; an offline GPU node may lack the pybind11 package, and
    a failed import would stop the whole build (the CUDA extension with it): torch's copy stands in."""
    pytest.importorskip("pybind11") if with_package else monkeypatch.setitem(sys.modules, "pybind11", None)
    include = pathlib.Path(setup_helpers()["pybind11_include"]())
    assert (include / "pybind11" / "pybind11.h").is_file()
    assert ("torch" in include.parts) != with_package
