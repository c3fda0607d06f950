"""Helpers of the CUDA kernel tests: the check that no CUDA error is left pending after a test, as
an autouse fixture for the modules that import it, and `on_side_stream`.

A launch error (a bad configuration, too much shared memory) is not sticky: cudaGetLastError
returns it once and clears it, and an unchecked launch leaves it for whichever call looks next.
The fixture reads it with cudaGetLastError, through the CUDA runtime this process has loaded (found
in /proc/self/maps; by name where that fails), so a leftover error fails the test that left it and
not, again, every test after it; where no runtime can be opened, a torch kernel launch stands in
(torch checks cudaGetLastError after its own launches, so a pending error surfaces there)."""
import ctypes

import pytest
import torch

_RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


def _loaded_runtime_path():
    """The path of the libcudart this process has loaded (torch's, shared by megalite._cuda, which
    links the same soname), from /proc/self/maps; None where there is none to read."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcudart.so" in path:
                    return path
    except OSError:
        pass
    return None


def _runtime():
    """The loaded CUDA runtime first: an error is pending in the runtime that the launch went
    through, and a second copy of libcudart opened by name would have its own (empty) state."""
    loaded = _loaded_runtime_path()
    for name in ((loaded,) if loaded else ()) + _RUNTIME_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def pending_cuda_error() -> str:
    """'' when no CUDA error is pending (after synchronizing), else the error's name; the error is
    taken (cleared) as it is read, so that one test's leftover does not fail every test after it."""
    torch.cuda.synchronize()   # raises on an asynchronous (sticky) error
    runtime = _runtime()
    if runtime is None:
        try:
            torch.ones(1, device="cuda").add_(1)   # torch checks cudaGetLastError after its launches
            torch.cuda.synchronize()
        except RuntimeError as error:
            return str(error).splitlines()[0]
        return ""
    status = runtime.cudaGetLastError()
    if status == 0:
        return ""
    runtime.cudaGetErrorName.restype = ctypes.c_char_p
    return runtime.cudaGetErrorName(status).decode()


@pytest.fixture(autouse=True)
def no_pending_cuda_error():
    if not torch.cuda.is_available():
        yield
        return
    assert pending_cuda_error() == "", "a CUDA error was pending before the test"
    yield
    error = pending_cuda_error()
    assert error == "", f"the test left a CUDA error pending: {error}"


def on_side_stream(fn, *inputs):
    """fn(*inputs) on a new stream, its inputs written there behind a ~0.1 s spin (torch.cuda._sleep)
    into tensors that hold NaN until then: a kernel launched on another stream (the default one,
    idle) would run at once and read the NaN.  Returns fn's result, the side stream synchronized."""
    late = [torch.full_like(t, float("nan")) if t is not None else None for t in inputs]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        for target, source in zip(late, inputs):
            if target is not None:
                target.copy_(source)
        out = fn(*late)
    stream.synchronize()
    return out
