"""Fixtures that run a kernel test under every CPU kernel table this machine has (import them)."""
import pytest


def _native_isas():
    try:
        import megalite._C as native
    except ImportError:
        return []
    return ["generic", "avx2"] if native.isa() == "avx2" else ["generic"]


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
    """The CPU kernels for this test: 'generic', 'avx2' (where the CPU has it), or 'reference'
    (MEGALITE_KERNELS=reference: the same assertions then hold for the pure-PyTorch path)."""
    yield from _use(request, monkeypatch, request.param)


@pytest.fixture(params=_native_isas() or ["reference"])
def native_isa(request, monkeypatch):
    """Only the compiled tables: for tests whose oracle IS the reference (comparing the reference
    with itself would prove nothing).  Falls back to the reference where _C is not built."""
    yield from _use(request, monkeypatch, request.param)
