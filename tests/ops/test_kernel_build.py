"""How the CPU kernels are compiled: the AVX2 and AVX-512 copies build with every compiler, and the
widest one the CPU has is used.

csrc/cpu/kernels_avx2.cpp and kernels_avx512.cpp compile the kernel headers under a target pragma
(AVX2 + FMA; AVX-512 F/BW/DQ/VL + BF16) so that one build runs on any x86-64 and picks the widest
table at run time.  Their rule: every header that is not one of ours is included above the pragma.
A standard-library header first entered below it breaks the build under GCC 13+ (libstdc++'s
always_inline allocator members become AVX2 functions that baseline callers cannot inline: "target
specific option mismatch"), though GCC 12 -- the CI's compiler -- accepts it.  So the rule is
checked here on the preprocessed source, which needs only a compiler's preprocessor, whatever its
version.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"

# A target pragma as GCC or clang spells it in our sources.
TARGET_PRAGMA = re.compile(r"^\s*#\s*pragma\s+(GCC\s+target|clang\s+attribute\s+push\s*\(.*target)")
# A preprocessor line marker: # <line> "<file>" <flags>; flag 1 = entering that file, 2 = back in it.
LINE_MARKER = re.compile(r'^# \d+ "([^"]+)"((?: \d)*)$')


def sources_with_target_pragmas():
    return sorted(path for path in CSRC.rglob("*.cpp")
                  if any(TARGET_PRAGMA.match(line) for line in path.read_text().splitlines()))


def preprocess(compiler, source):
    return subprocess.run([compiler, "-E", "-std=c++17", "-fopenmp", f"-I{CSRC}", str(source)],
                          capture_output=True, text=True)


def compilers():
    """The build's compiler (CXX, else c++), and g++ and clang++ where installed: the GCC and clang
    branches of the pragma are checked alike."""
    params = []
    for name in dict.fromkeys([os.environ.get("CXX", "c++"), "g++", "clang++"]):
        if shutil.which(name) is None:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} is not installed")))
        else:
            params.append(name)
    return params


def headers_entered_below_pragma(preprocessed: str, source: pathlib.Path):
    """Whether the source's own target pragma was seen, and (header, includer) for every file outside
    csrc/ first entered after it.  First: <cmath> and others have no whole-file guard and are entered
    again by every #include, to no effect once their guarded part is defined."""
    stack, entered, pragma_seen, late = [], set(), False, []
    for line in preprocessed.splitlines():
        marker = LINE_MARKER.match(line)
        if marker:
            path, flags = marker.group(1), marker.group(2).split()
            if "1" in flags:
                ours = os.path.abspath(path).startswith(str(CSRC) + os.sep) or path.startswith("<")
                if pragma_seen and not ours and path not in entered:
                    late.append((path, stack[-1] if stack else str(source)))
                entered.add(path)
                stack.append(path)
            elif "2" in flags and stack:
                stack.pop()
            elif not stack:
                stack.append(path)   # the first marker names the source itself
            continue
        if stack and os.path.abspath(stack[-1]) == str(source) and TARGET_PRAGMA.match(line):
            pragma_seen = True
    return pragma_seen, late


@pytest.mark.parametrize("compiler", compilers())
@pytest.mark.parametrize("source", sources_with_target_pragmas(), ids=lambda p: str(p.relative_to(CSRC)))
def test_no_system_header_below_a_target_pragma(compiler, source):
    result = preprocess(compiler, source)
    if "omp.h" in result.stderr and "not found" in result.stderr:
        pytest.skip(f"{compiler} finds no omp.h (clang needs libomp-dev), so it cannot build megalite here")
    assert result.returncode == 0, f"{compiler} -E {source.name} failed:\n{result.stderr[-2000:]}"
    pragma_seen, late = headers_entered_below_pragma(result.stdout, source.resolve())
    assert pragma_seen, f"{compiler} -E {source.name}: no target pragma found in its output; update TARGET_PRAGMA"
    assert not late, "\n".join(
        f"{source.name}: {header} is first included (from {includer}) below the target pragma; "
        f"include it above the pragma in {source.name}" for header, includer in late)


def test_the_guard_sees_a_late_header():
    # The check on a two-line source with <vector> below the pragma (the GCC 13 build failure).
    source = CSRC / "cpu" / "kernels_avx2.cpp"
    preprocessed = "\n".join([f'# 1 "{source}"', '#pragma GCC target("avx2,fma")',
                              '# 1 "/usr/include/c++/13/vector" 1 3', f'# 2 "{source}" 2'])
    assert headers_entered_below_pragma(preprocessed, source) == (True, [("/usr/include/c++/13/vector", str(source))])


def test_every_table_is_checked():
    # A table whose pragma TARGET_PRAGMA does not recognise would silently escape the check above.
    assert {"kernels_avx2.cpp", "kernels_avx512.cpp"} <= {path.name for path in sources_with_target_pragmas()}


def widest_table_of_this_cpu():
    """The table best_kernels() must pick, from the flags /proc/cpuinfo lists (None without it)."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "generic"


@pytest.mark.skipif(widest_table_of_this_cpu() is None, reason="no /proc/cpuinfo to compare with")
def test_the_widest_table_the_cpu_has_is_chosen():
    native = pytest.importorskip("megalite._C", reason="the C++ extension is not built")
    assert native.isa() == widest_table_of_this_cpu()


def test_set_isa_refuses_what_it_cannot_run():
    native = pytest.importorskip("megalite._C", reason="the C++ extension is not built")
    with pytest.raises(ValueError, match="avx1024 is not one of auto, generic, avx2, avx512"):
        native.set_isa("avx1024")
    if widest_table_of_this_cpu() in ("generic", "avx2"):
        with pytest.raises(ValueError, match="this CPU lacks one of AVX-512 F, BW, DQ, VL"):
            native.set_isa("avx512")
    assert native.isa() == widest_table_of_this_cpu()   # a refused name leaves the choice as it was
