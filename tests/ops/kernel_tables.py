"""Fixtures that run a kernel test under every CPU kernel table this machine has (loaded for every
test by tests/conftest.py)."""
import os

import pytest
import torch  # noqa: F401  (megalite._C links against torch's libraries: torch must be loaded first)


def _native_isas():
    try:
        import megalite._C as native
    except ImportError:
        return []
    tables = ["generic", "avx2", "avx512"]   # each CPU that has a table also has the ones before it
    return tables[:tables.index(native.isa()) + 1]


def _use(request, monkeypatch, isa):
    if isa == "reference":
        monkeypatch.setenv("MEGALITE_KERNELS", "reference")
        yield "reference"
        return
    import megalite._C as native
    native.set_isa(isa)
    yield isa
    native.set_isa("auto")


@pytest.fixture(params=_native_isas() + ["reference"])
def cpu_isa(request, monkeypatch):
    """The CPU kernels for this test: 'generic', 'avx2' and 'avx512' (each where the CPU has it), or
    'reference' (MEGALITE_KERNELS=reference: the same assertions then hold for the pure-PyTorch path)."""
    yield from _use(request, monkeypatch, request.param)


@pytest.fixture(params=_native_isas() or ["reference"])
def native_isa(request, monkeypatch):
    """Only the compiled tables: for tests whose oracle IS the reference (comparing the reference
    with itself would prove nothing).  Falls back to the reference where _C is not built."""
    yield from _use(request, monkeypatch, request.param)


@pytest.fixture(params=["cached", "streamed"])
def output_stores(request):
    """How the C++ kernels write their large outputs (the norms' y and dx, master-mode Adam's model
    params): stores through the cache, or streaming stores (which they use from 16 MiB; forced here
    so that small shapes take that path too)."""
    if request.param == "cached":
        yield "cached"
        return
    if os.environ.get("MEGALITE_KERNELS") == "reference":
        pytest.skip("the reference has no streaming stores (it would only repeat the 'cached' run)")
    try:
        import megalite._C as native
    except ImportError:
        pytest.skip("streaming stores are a path of the C++ kernels, and megalite._C is not built")
    previous = native.set_stream_min_bytes(0)
    yield "streamed"
    native.set_stream_min_bytes(previous)
