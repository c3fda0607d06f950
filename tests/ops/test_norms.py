"""megalite.ops.layer_norm / rms_norm (C++ kernels) against the pure-PyTorch reference.

Tolerances: fp32 -- the kernel and the reference sum the same terms in a different order, so they
differ by float32 round-off (rtol 1e-5 within a row); dweight and dbias are sums over all rows,
whose round-off grows with the number of rows R, so their atol is 1e-5 * R / 100 (R up to 1000).
bf16/fp16 -- both compute in fp32 and round the result once; the fp32 round-off can tip a rounding
the other way, so they agree to within one unit in the last place of the output format: at most
2^-7 of the value for bf16 (8 significant bits) and 2^-10 for fp16 (11), the rtol; atol 1 ulp of
values of size ~1.  (A bf16 rtol of 2^-8, half an ulp, fails on such a tip at some values from 4 up.)
"""
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megalite.ops import layer_norm, reference, rms_norm

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5),   # dweight/dbias: scaled by rows, see below
             torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7),
             torch.float16: dict(rtol=2 ** -10, atol=2 ** -10)}


def tolerance(name, dtype, x):
    if name in ("dweight", "dbias") and dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * max(1.0, x.numel() / x.shape[-1] / 100))
    return TOLERANCE[dtype]


SHAPES = [(1, 7), (5, 1), (33, 77), (3, 4, 129), (1001, 64), (2, 1031)]   # 1001 rows: uneven thread split
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_with_grads(fn, x, weight, bias, dy):
    """Forward + backward; returns (y, dx, dweight, dbias) with fresh leaves."""
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if bias is not None else None
    y = fn(x, weight, bias)
    y.backward(dy)
    return [y.detach(), x.grad, weight.grad] + ([bias.grad] if bias is not None else [])


def make_inputs(shape, dtype, weight_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)       # non-zero mean exercises centering
    dy = torch.randn(shape, generator=gen).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(weight_dtype)
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(weight_dtype)
    return x, dy, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(native_isa, output_stores, shape, dtype, fp32_weight, with_bias):
    x, dy, weight, bias = make_inputs(shape, dtype, torch.float32 if fp32_weight else dtype)
    bias = bias if with_bias else None
    ours = run_with_grads(lambda a, w, b: layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
    expected = run_with_grads(lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, expected):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), **tolerance(name, dtype, x), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_rms_norm_matches_reference(native_isa, output_stores, shape, dtype, fp32_weight):
    x, dy, weight, _ = make_inputs(shape, dtype, torch.float32 if fp32_weight else dtype)
    ours = run_with_grads(lambda a, w, b: rms_norm(a, w, 1e-5), x, weight, None, dy)
    expected = run_with_grads(lambda a, w, b: reference.rms_norm(a, w, 1e-5), x, weight, None, dy)
    for name, got, want in zip(("y", "dx", "dweight"), ours, expected):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), **tolerance(name, dtype, x), msg=lambda m: f"{name}: {m}")


def test_references_match_torch():
    """The oracle itself: the references equal torch's LayerNorm and RMSNorm in fp32."""
    x, dy, weight, bias = make_inputs((17, 300), torch.float32, torch.float32)
    torch.testing.assert_close(reference.layer_norm(x, weight, bias, 1e-5), F.layer_norm(x, (300,), weight, bias, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, weight, 1e-6), F.rms_norm(x, (300,), weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_large_inputs_match_reference(cpu_isa, output_stores, dtype):
    """Benchmark-sized inputs (> 8 MiB, many rows per thread); odd row length, so rows are not 16-byte aligned."""
    shape = (2 * 2**20 // 1031 + 3, 1031) if dtype == torch.float32 else (4 * 2**20 // 1031 + 3, 1031)
    x, dy, weight, bias = make_inputs(shape, dtype, dtype)
    ours = run_with_grads(lambda a, w, b: layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
    expected = run_with_grads(lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, expected):
        tol = tolerance(name, dtype, x)
        if dtype == torch.bfloat16 and name in ("dweight", "dbias"):
            # sums over ~4000 rows in a different order: the fp32 round-off can flip the final bf16
            # rounding by one ulp, up to 2^-7 relative at the bottom of a binade
            tol = dict(rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{name}: {m}")


def test_stream_threshold_setter():
    native = pytest.importorskip("megalite._C")
    previous = native.set_stream_min_bytes(123)
    try:
        assert native.set_stream_min_bytes(456) == 123
        with pytest.raises(ValueError, match="stream_min_bytes must be >= 0 bytes, got -1"):
            native.set_stream_min_bytes(-1)
        assert native.set_stream_min_bytes(previous) == 456
    finally:
        native.set_stream_min_bytes(previous)


def test_large_mean_keeps_precision(cpu_isa):
    """Rows with mean 1e4 and spread 1: the two-pass variance must not cancel catastrophically."""
    gen = torch.Generator().manual_seed(3)
    x = 1e4 + torch.randn(8, 4096, generator=gen)
    weight, bias = torch.ones(4096), torch.zeros(4096)
    got = layer_norm(x, weight, bias, 1e-5)
    want = F.layer_norm(x.double(), (4096,), weight.double(), bias.double(), 1e-5).float()
    # an fp32 mean near 1e4 is known to half an ulp (2^-11 ~ 5e-4), which shifts every output by as much
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_empty_batch(cpu_isa):
    x = torch.zeros(0, 16, requires_grad=True)
    y = layer_norm(x, torch.ones(16), torch.zeros(16), 1e-5)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)


def test_non_contiguous_input_is_refused():
    x = torch.randn(8, 6).t()     # [6, 8] view with strides (1, 6)
    with pytest.raises(ValueError, match="not contiguous.*contiguous"):
        layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="not contiguous"):
        rms_norm(x, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight.*not contiguous"):
        rms_norm(torch.randn(3, 4), torch.ones(4, 2)[:, 0], 1e-5)


def test_wrong_device_is_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight is on meta.*other inputs are on cpu"):
        layer_norm(x, torch.ones(8, device="meta"), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="bias is on meta"):
        layer_norm(x, torch.ones(8), torch.zeros(8, device="meta"), 1e-5)


def test_bad_shapes_and_dtypes_are_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x has shape \(\); the norms need x: \[..., h\]"):
        layer_norm(torch.tensor(1.0), torch.ones(1), None, 1e-5)
    with pytest.raises(ValueError, match=r"x has shape \(3, 0\).*h >= 1"):
        rms_norm(torch.zeros(3, 0), torch.ones(0), 1e-5)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\)"):
        layer_norm(x, torch.ones(7), None, 1e-5)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        rms_norm(x.double(), torch.ones(8), 1e-5)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        rms_norm(x.bfloat16(), torch.ones(8, dtype=torch.float16), 1e-5)


def test_native_operator_checks_its_inputs():
    """The C++ operators refuse bad tensors themselves, for callers that bypass megalite.ops."""
    native = pytest.importorskip("megalite._C")
    del native
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.megalite.rms_norm_forward(torch.randn(8, 6).t(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight has shape"):
        torch.ops.megalite.layer_norm_forward(torch.randn(4, 8), torch.ones(7), None, 1e-5)


ZERO_COLUMNS = """
import torch
import megalite._C  # noqa: F401
x, w = torch.zeros(4, 0), torch.ones(0)
y, mean, rstd = torch.ops.megalite.layer_norm_forward(x, w, w, 1e-5)
dx, dw, db = torch.ops.megalite.layer_norm_backward(x, x, mean, rstd, w)
y2, rstd2 = torch.ops.megalite.rms_norm_forward(x, w, 1e-5)
dx2, dw2 = torch.ops.megalite.rms_norm_backward(x, x, rstd2, w)
assert y.shape == dx.shape == y2.shape == dx2.shape == (4, 0) and dw.numel() == db.numel() == dw2.numel() == 0
print("ok")
"""


def test_native_operators_take_zero_columns():
    """A direct operator call with h = 0 (megalite.ops refuses it; torch.ops.megalite does not): empty
    outputs, no read of a row's first element (the forward used to read x[0] of an empty row and
    crash).  In a child process, so that a crash fails this test and not the run."""
    pytest.importorskip("megalite._C")
    done = subprocess.run([sys.executable, "-c", ZERO_COLUMNS], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-500:])
