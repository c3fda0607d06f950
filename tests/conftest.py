"""Session-wide: the report header says how multi-rank tests start their ranks, the CPU kernel-table
fixtures (cpu_isa, native_isa, output_stores) serve the norm and Adam tests, and every test must
leave ``sys.path`` as it found it.

A failure log from another machine then shows at its top whether ranks were forked from pytest or
from the fork server (megalite/parallel/testing.py), which is the first question when ranks misbehave.

A folder left on ``sys.path`` by one test makes its modules shadow installed distributions for every
test after it (a ``kernels.py`` there hid the package transformers imports), so the change is
reported at the test that made it, not at the test that then fails.
"""
import os
import sys

import pytest

from megalite.parallel.testing import START_ENV, rank_start_method

pytest_plugins = ["tests.ops.kernel_tables"]


def pytest_report_header(config):
    return f"megalite ranks: {rank_start_method()} ({START_ENV}={os.environ.get(START_ENV, 'auto')})"


def sys_path_change(before, after):
    """'added [...], removed [...]' between two copies of sys.path, or '' when they are equal."""
    if before == after:
        return ""
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    return f"added {added}, removed {removed}" if added or removed else f"reordered to {after}"


@pytest.fixture(autouse=True)
def sys_path_unchanged(request):
    before = list(sys.path)
    yield
    change = sys_path_change(before, list(sys.path))
    sys.path[:] = before
    if change:
        pytest.fail(f"{request.node.nodeid} changed sys.path ({change}); use monkeypatch.syspath_prepend, "
                    "or import benchmarks.<name> / tools.<name> as packages", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_pycollect_makemodule(module_path, parent):
    """A test module that edits sys.path when imported (at collection) is refused the same way."""
    before = list(sys.path)
    outcome = yield
    module = outcome.get_result()
    try:
        module.obj   # import now, inside the comparison; pytest keeps the module
    except Exception:
        pass         # pytest imports it again and reports the error as usual
    expected = _with_pytests_own_insertion(module_path, before)
    change = sys_path_change(expected, list(sys.path))
    if change:
        sys.path[:] = expected
        raise pytest.UsageError(f"{module_path} changed sys.path when imported ({change}); import benchmarks.<name> "
                                "or tools.<name> as packages instead")


def _with_pytests_own_insertion(module_path, path):
    """sys.path as pytest's prepend import mode leaves it: the folder above the test module's outermost
    package first."""
    root = module_path.parent
    while (root / "__init__.py").exists():
        root = root.parent
    return path if path[:1] == [str(root)] else [str(root)] + path
