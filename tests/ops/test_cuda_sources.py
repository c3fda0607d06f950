"""Every CUDA launch and runtime call in csrc/cuda is checked -- read from the sources, so that it is
seen on a machine without a GPU.

A failed launch (too much shared memory, a bad grid, no kernel image for the GPU) or runtime call
leaves its outputs unwritten and its error pending for whichever call looks next.  The rule
(csrc/cuda/launch_checks.h): the statement after each `kernel<<<...>>>(...);` is
`check_launch("<that kernel>", ...)`, and each `cuda*(...)` runtime call is the first argument of
`check_cuda(...)` (the error-message helpers and the one cudaGetLastError inside check_launch
aside).  Whether the checks fire on a real failure is for the CUDA tests."""
import pathlib
import re

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda"
RUNTIME_CALL = re.compile(r"\b(cuda[A-Z]\w*)\s*\(")
UNCHECKED_ALLOWED = {"cudaGetErrorName", "cudaGetErrorString"}   # they report an error, they cannot fail


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def closing(text: str, start: int, open_char: str, close_char: str) -> int:
    """Index just past the bracket that closes text[start] (an open_char)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {open_char: 1, close_char: -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced {open_char} at {start}")


def launched_name(text: str, launch: int) -> str:
    """The identifier launched at text[launch] ('<<<'): template arguments skipped backward."""
    end = len(text[:launch].rstrip())
    if text[end - 1] == ">":
        depth, i = 0, end - 1
        while True:
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
            i -= 1
        end = i
    return re.search(r"(\w+)\s*$", text[:end]).group(1)


def unchecked(text: str):
    """(launches found, [problems]) of one source's text."""
    text = strip_comments(text)
    problems, launches = [], 0
    for match in re.finditer(r"<<<", text):
        launches += 1
        name = launched_name(text, match.start())
        args = text.index("(", text.index(">>>", match.start()))
        after = text[closing(text, args, "(", ")"):].lstrip()
        if not after.startswith(";"):
            problems.append(f"launch of {name}: no ';' after its arguments")
            continue
        following = after[1:].lstrip()
        expected = f'check_launch("{name}"' if name.endswith("_kernel") else "check_launch("
        if not following.startswith(expected):
            problems.append(f"launch of {name} not followed by {expected}...): {following[:60]!r}")
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)   # a call's name inside a message is no call
    for match in RUNTIME_CALL.finditer(text):
        call = match.group(1)
        if call in UNCHECKED_ALLOWED:
            continue
        before = text[:match.start()].rstrip()
        if not before.endswith("check_cuda("):
            problems.append(f"{call}(...) not inside check_cuda(...): {text[match.start():match.start() + 60]!r}")
    return launches, problems


SOURCES = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cpp", ".cuh", ".h"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_launch_and_runtime_call_is_checked(path):
    text = path.read_text()
    if path.name == "launch_checks.h":   # check_launch itself reads the launch error
        text = text.replace("check_cuda(cudaGetLastError(), kernel, shape)", "")
    _, problems = unchecked(text)
    assert problems == [], f"{path.name}: " + "; ".join(problems)


def test_the_launches_are_found():
    counts = {p.name: unchecked(p.read_text())[0] for p in SOURCES}
    assert counts["adam.cu"] >= 3 and counts["norms.cu"] >= 4 and counts["norms_row_cached.cu"] >= 3
    assert counts["swiglu.cu"] >= 2


def test_the_rule_sees_an_unchecked_launch_and_call():
    bad = """
      norm_kernel<T, W, decltype(p)::value><<<grid, 256, 0, stream>>>(x, y);   // unchecked
      other_kernel<<<1, 32>>>(x);
      check_launch("another_kernel", shape);
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      check_cuda(cudaGetDevice(&device), "cudaGetDevice", "");
    """
    launches, problems = unchecked(bad)
    assert launches == 2 and len(problems) == 3, problems
    assert "norm_kernel" in problems[0] and "other_kernel" in problems[1] and "cudaFuncSetAttribute" in problems[2]
