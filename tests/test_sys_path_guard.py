"""tests/conftest.py's guard: a test, or a test module when imported, that leaves sys.path changed is
reported by name, and the tests after it see the path as it was."""
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

EDITS_IN_A_TEST = '''
import sys

def test_edits():
    sys.path.insert(0, "/megalite-probe-folder")

def test_after():
    assert "/megalite-probe-folder" not in sys.path
'''
EDITS_AT_IMPORT = '''
import sys
sys.path.append("/megalite-probe-folder")

def test_nothing():
    pass
'''


@pytest.fixture
def probe_folder():
    folder = ROOT / "tests" / "sys_path_probe_tmp"   # under tests/ so that its conftest applies
    folder.mkdir()
    yield folder
    shutil.rmtree(folder)


def run_probe(folder, source):
    (folder / "test_probe.py").write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_test_that_edits_sys_path_is_reported_and_undone(probe_folder):
    done = run_probe(probe_folder, EDITS_IN_A_TEST)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "test_probe.py::test_edits changed sys.path (added ['/megalite-probe-folder'], removed [])" in done.stdout
    assert "2 passed, 1 error" in done.stdout      # test_edits errs at teardown; test_after saw the old path


def test_a_module_that_edits_sys_path_when_imported_is_refused(probe_folder):
    done = run_probe(probe_folder, EDITS_AT_IMPORT)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "test_probe.py changed sys.path when imported (added ['/megalite-probe-folder']" in done.stdout + done.stderr
