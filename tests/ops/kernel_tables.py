"""The cpu_isa fixture: runs a kernel test under every CPU kernel table this machine has (import it)."""
import pytest


def _isas():
    try:
        import megalite._C as native
    except ImportError:
        return ["reference"]
    return (["generic", "avx2"] if native.isa() == "avx2" else ["generic"]) + ["reference"]


@pytest.fixture(params=_isas())
def cpu_isa(request, monkeypatch):
    """The CPU kernels for this test: 'generic', 'avx2' (where the CPU has it), or 'reference'
    (MEGALITE_KERNELS=reference: the same assertions then hold for the pure-PyTorch path)."""
    if request.param == "reference":
        monkeypatch.setenv("MEGALITE_KERNELS", "reference")
        yield "reference"
        return
    import megalite._C as native
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")
