"""The CUDA kernels where the first tests did not look: LayerNorm at hidden 6,112-6,144 (shared memory
at the 48 KiB line), norm backward blocks that walk many rows, Adam's launches cut at the block
limit, a non-default stream, FusedAdam against torch.optim.AdamW on the GPU, master-weight mode,
NaN/inf inputs, SwiGLU's second grid-stride pass, and errors: none may stay pending after an op
(the autouse fixture of tests/ops/cuda_checks.py), and a failed launch raises one line.  Skipped
without a CUDA device; tests/ops/test_launch_plan.py checks the launch arithmetic on the CPU."""
import copy

import pytest
import torch

from megalite.ops import backend, layer_norm, reference, rms_norm, swiglu
from megalite.optim.adam import FusedAdam, adam_step, adam_step_master, adam_step_master_reference, adam_step_reference
from tests.ops.cuda_checks import no_pending_cuda_error, on_side_stream  # noqa: F401 (autouse fixture)
from tests.ops.test_norms import make_inputs, run_with_grads, tolerance

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not backend.native_available(torch.device("cuda")),
                                 reason="needs a CUDA device and the megalite._cuda extension")]

CHUNK = 65536
ADAM_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def check_norms(shape, dtype, weight_dtype, run=lambda fn, *args: fn(*args)):
    x, dy, weight, bias = (t.cuda() for t in make_inputs(shape, dtype, weight_dtype))
    for ours_fn, reference_fn, maybe_bias in (
            (lambda a, w, b: layer_norm(a, w, b, 1e-5), lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), bias),
            (lambda a, w, b: rms_norm(a, w, 1e-5), lambda a, w, b: reference.rms_norm(a, w, 1e-5), None)):
        ours = run(lambda *tensors: run_with_grads(ours_fn, *tensors), x, weight, maybe_bias, dy)
        expected = run_with_grads(reference_fn, x, weight, maybe_bias, dy)
        for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, expected):
            torch.testing.assert_close(got.float(), want.float(), **tolerance(name, dtype, x))


@pytest.mark.parametrize("cols", [6112, 6120, 6128, 6136, 6144, 8160, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norms_at_the_shared_memory_line(cols, dtype):
    """LayerNorm's accumulators are 47.75-48 KiB at 6,112-6,144 columns: with the kernel's static
    shared memory the launch needs the opt-in (or, past the device's limit, the general kernels).
    Before, it did not launch and dx came back uninitialized.  512 rows: several per block."""
    check_norms((512, cols), dtype, dtype)


def test_6144_takes_the_cached_kernel_where_it_fits():
    """LayerNorm's 48 KiB of accumulators plus the static bytes fit the opt-in limit of every GPU from
    sm_70 on (64 KiB on sm_75, 96 KiB and more elsewhere), not sm_6x's 48 KiB (launch_plan.h)."""
    from torch.profiler import ProfilerActivity, profile
    fits = torch.cuda.get_device_capability() >= (7, 0)
    x, dy, weight, bias = (t.cuda().requires_grad_() if i != 1 else t.cuda()
                           for i, t in enumerate(make_inputs((64, 6144), torch.bfloat16, torch.bfloat16)))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer_norm(x, weight, bias, 1e-5).backward(dy)
        torch.cuda.synchronize()
    names = " ".join(event.key for event in prof.key_averages())
    assert ("cached_backward_kernel" in names) == fits, names
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("shape", [(20000, 1024), (6000, 4096), (3000, 8192), (40000, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_backward_blocks_walk_many_rows(shape, dtype):
    """Rows far beyond the resident blocks (~2,000 at 1,024 columns on an H100): each block of the
    cached backward accumulates dweight/dbias over many rows in shared memory."""
    check_norms(shape, dtype, torch.float32)


def test_norms_on_a_side_stream():
    check_norms((300, 1024), torch.bfloat16, torch.bfloat16, run=on_side_stream)
    check_norms((33, 77), torch.float32, torch.float32, run=on_side_stream)


def test_norms_with_nan_and_inf_rows():
    """A NaN in one row and an inf in another: those rows (and dweight/dbias, sums over every row) are
    NaN as in the reference, the other rows are untouched by them."""
    for cols in (1024, 77):
        x, dy, weight, bias = (t.cuda() for t in make_inputs((64, cols), torch.float32, torch.float32))
        x[3, 5], x[10, 0] = float("nan"), float("inf")
        for ours_fn, reference_fn, maybe_bias in (
                (lambda a, w, b: layer_norm(a, w, b, 1e-5), lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), bias),
                (lambda a, w, b: rms_norm(a, w, 1e-5), lambda a, w, b: reference.rms_norm(a, w, 1e-5), None)):
            ours = run_with_grads(ours_fn, x, weight, maybe_bias, dy)
            want = run_with_grads(reference_fn, x, weight, maybe_bias, dy)
            for got, expected in zip(ours, want):   # equal_nan: NaN in exactly the same places
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3, equal_nan=True)


def adam_case(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lists = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(3)]
    return lists + [[torch.rand(n, generator=gen) for n in sizes]]


@pytest.mark.parametrize("sizes", [
    [2 * 320 * CHUNK + 7],                     # the block limit twice inside one tensor: carried over
    [320 * CHUNK, 5, 3],                       # a tensor ending exactly at the block limit
    [CHUNK + 1] * 23 + [300 * CHUNK + 9],      # the 24th tensor crosses the block limit
    [1] * 23 + [3 * CHUNK, 2, 330 * CHUNK],    # the tensor limit at a last chunk, then the block limit
], ids=["one-tensor", "exact-limit", "24th-crosses", "both-limits"])
def test_adam_launches_cut_at_the_block_limit(sizes):
    lists = [[t.cuda() for t in role] for role in adam_case(sizes)]
    expected = copy.deepcopy(lists)
    adam_step(*lists, step=3, **ADAM_HYPER)
    adam_step_reference(*expected, step=3, **ADAM_HYPER)
    for got, want in zip(sum(lists, []), sum(expected, [])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_adam_on_a_side_stream_and_with_nan_gradients():
    sizes = [1000, 70001]
    lists = adam_case(sizes)
    lists[1][0][17] = float("nan")
    lists[1][1][4] = float("inf")
    gpu = [[t.cuda() for t in role] for role in lists]
    got = on_side_stream(lambda *flat: (adam_step(*[list(flat[i:i + 2]) for i in range(0, 8, 2)], step=2,
                                                  **ADAM_HYPER), flat)[1], *sum(gpu, []))
    expected = copy.deepcopy(lists)
    adam_step_reference(*expected, step=2, **ADAM_HYPER)
    for tensor, want in zip(got, sum(expected, [])):
        torch.testing.assert_close(tensor.cpu(), want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_matches_torch_adamw_on_the_gpu(adam_w_mode):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (65537,), (3, 5), (1024, 1024)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    ours_params = [torch.nn.Parameter(t.cuda()) for t in start]
    peer_params = [torch.nn.Parameter(t.cuda()) for t in start]
    ours = FusedAdam(ours_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, adam_w_mode=adam_w_mode)
    peer = (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(peer_params, lr=1e-2, betas=(0.9, 0.95),
                                                                     weight_decay=0.1)
    for _ in range(10):
        for a, b in zip(ours_params, peer_params):
            a.grad = torch.randn(a.shape, generator=gen).cuda()
            b.grad = a.grad.clone()
        ours.step()
        peer.step()
    for a, b in zip(ours_params, peer_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_dtype, grad_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_master_weight_mode(model_dtype, grad_dtype, adam_w_mode):
    """Several steps at loss scale 1024 against the reference, fp16 and bf16 models, Adam and AdamW;
    then check_finite=False, and a flag raised before the call that skips the whole step."""
    gen = torch.Generator().manual_seed(3)
    masters = [torch.randn(n, generator=gen) for n in (3, 4097, 2 * CHUNK + 1)]
    case = [[m.to(model_dtype) for m in masters], None, masters, [torch.zeros_like(m) for m in masters],
            [torch.zeros_like(m) for m in masters]]
    expected, gpu = copy.deepcopy(case), [[t.cuda() for t in role] if role else None for role in case]
    hyper = dict(ADAM_HYPER, adam_w_mode=adam_w_mode, grad_scale=1024.0)
    for step in range(1, 4):
        grads = [(torch.randn(m.shape, generator=gen) * 1024).to(grad_dtype) for m in masters]
        expected[1], gpu[1] = grads, [g.cuda() for g in grads]
        adam_step_master(*gpu, step=step, **hyper, check_finite=step != 2)
        adam_step_master_reference(*expected, step=step, **hyper, found_inf=torch.zeros(1))
    for got, want in zip(gpu[2], expected[2]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    for param, master in zip(gpu[0], gpu[2]):   # each model parameter is its own master, rounded
        assert torch.equal(param, master.to(model_dtype))
    before = [[t.clone() for t in role] for role in gpu]
    flag = adam_step_master(*gpu, step=4, **hyper, found_inf=torch.ones(1, device="cuda"))
    assert flag.item() == 1.0
    assert all(torch.equal(a, b) for role_a, role_b in zip(gpu, before) for a, b in zip(role_a, role_b))


@pytest.mark.parametrize("model_dtype, grad_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_master_weight_mode_misaligned_over_several_launches(model_dtype, grad_dtype):
    """330 chunks (two launches, one tensor carried over), 30 tensors (past the 24 slots); the even
    tensors' lists at element offsets that break the vector alignment (the scalar path, the large
    tensor included), the odd ones aligned (the vector path), in both passes."""
    from tests.ops.test_cuda_kernels import misaligned
    gen = torch.Generator().manual_seed(4)
    sizes = [330 * CHUNK + 5] + [1 + 37 * i for i in range(29)]
    masters = [torch.randn(n, generator=gen) for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 256).to(grad_dtype) for n in sizes]
    case = [[m.to(model_dtype) for m in masters], grads, masters, [torch.zeros(n) for n in sizes],
            [torch.zeros(n) for n in sizes]]
    expected = copy.deepcopy(case)
    gpu = [[misaligned(t.cuda(), 0 if i % 2 else (i // 2 + role) % 4) for i, t in enumerate(tensors)]
           for role, tensors in enumerate(case)]
    hyper = dict(ADAM_HYPER, grad_scale=256.0)
    assert adam_step_master(*gpu, step=1, **hyper).item() == 0.0
    adam_step_master_reference(*expected, step=1, **hyper, found_inf=torch.zeros(1))
    for got, want in zip(gpu[2] + gpu[3] + gpu[4], expected[2] + expected[3] + expected[4]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    for param, master in zip(gpu[0], gpu[2]):
        assert torch.equal(param, master.to(model_dtype))


def test_swiglu_second_grid_stride_pass():
    """More pairs than one pass of the capped grid (65535 * 8 blocks of 256 threads) covers: the
    scalar path (fp32 at an odd offset) past 2^27 pairs, the vector path (bf16, 4 pairs a step) past
    2^29.  SwiGLU is elementwise, so the reference runs on the first and last pairs only."""
    one_pass = 65535 * 8 * 256
    for dtype, offset, pairs in ((torch.float32, 1, one_pass + 12345), (torch.bfloat16, 0, 4 * one_pass + 999)):
        buffer = torch.randn(2 * pairs + offset, dtype=dtype, device="cuda")
        h = buffer[offset:]
        y = swiglu(h)
        dh = torch.ops.megalite.swiglu_backward(y, h)   # dy := y: any values will do
        close = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
        for part in (slice(0, 4096), slice(pairs - 4096, pairs)):
            hp = h[2 * part.start:2 * part.stop].detach().float().clone().requires_grad_()
            want = reference.swiglu(hp)   # in fp32, rounded once below: the kernel's arithmetic
            (want_grad,) = torch.autograd.grad(want, hp, y[part].float())
            torch.testing.assert_close(y[part], want.to(dtype), **close)
            torch.testing.assert_close(dh[2 * part.start:2 * part.stop], want_grad.to(dtype), **close)
        del buffer, h, y, dh
        torch.cuda.empty_cache()


def test_swiglu_with_nan_and_inf():
    values = torch.tensor([float("nan"), 1.0, float("inf"), 2.0, -float("inf"), 0.5, 1e4, -3.0, -1e4, 0.25,
                           0.0, float("nan")], device="cuda")
    h = values.repeat(100).requires_grad_()
    want_h = h.detach().clone().requires_grad_()
    ours, want = swiglu(h), reference.swiglu(want_h)
    dy = torch.ones_like(want)
    (grad,) = torch.autograd.grad(ours, h, dy)
    (want_grad,) = torch.autograd.grad(want, want_h, dy)
    for got, expected in ((ours, want), (grad, want_grad)):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_a_bad_input_raises_one_line_and_leaves_no_error():
    """An op refused in C++ raises a RuntimeError whose first line says why; nothing stays pending
    for the next op (the autouse fixture checks)."""
    t = [torch.zeros(4, device="cuda")]
    with pytest.raises(RuntimeError, match="grad_scale -1.* must be a positive finite number"):
        torch.ops.megalite.adam_step_master([t[0].half()], [t[0].half()], t, t, t, torch.zeros(1, device="cuda"), 1,
                                            1e-3, 0.9, 0.999, 1e-8, 0.0, True, -1.0, True)
    y = layer_norm(torch.randn(0, 6144, device="cuda", requires_grad=True), torch.ones(6144, device="cuda"), None,
                   1e-5)
    assert y.shape == (0, 6144)
    x, w = torch.zeros(4, 0, device="cuda"), torch.ones(0, device="cuda")   # h = 0 by a direct call
    y, mean, rstd = torch.ops.megalite.layer_norm_forward(x, w, w, 1e-5)
    dx, dweight, dbias = torch.ops.megalite.layer_norm_backward(x, x, mean, rstd, w)
    assert y.shape == dx.shape == (4, 0) and dweight.numel() == dbias.numel() == 0


def test_more_rows_than_the_grid_is_refused_in_one_line():
    """2^31 rows (one block per row) pass the grid's x limit of 2^31 - 1: refused before a launch
    (a cast to unsigned used to send a grid that could not launch).  x of one column, 4 GiB."""
    x = torch.empty(2 ** 31, 1, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=r"norm_forward_kernel \(rows 2147483648, cols 1.*more rows than"):
        layer_norm(x, torch.ones(1, dtype=torch.bfloat16, device="cuda"), None, 1e-5)
    del x
    torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_ops_on_a_second_device():
    """Tensors on cuda:1 while cuda:0 is current: each op must launch on their device (its guard) and
    on that device's current stream, as the references do there."""
    device = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    for shape, dtype in (((300, 1024), torch.bfloat16), ((33, 77), torch.float32)):
        x, dy, weight, bias = (t.to(device) for t in make_inputs(shape, dtype, dtype))
        ours = run_with_grads(lambda a, w, b: layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
        want = run_with_grads(lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), x, weight, bias, dy)
        for name, got, expected in zip(("y", "dx", "dweight", "dbias"), ours, want):
            assert got.device == device
            torch.testing.assert_close(got.float(), expected.float(), **tolerance(name, dtype, x))
    lists = [[t.to(device) for t in role] for role in adam_case([1000, 70001])]
    expected = copy.deepcopy(lists)
    adam_step(*lists, step=2, **ADAM_HYPER)
    adam_step_reference(*expected, step=2, **ADAM_HYPER)
    for got, want in zip(sum(lists, []), sum(expected, [])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    h = torch.randn(64, 2 * 1376, device=device)
    torch.testing.assert_close(swiglu(h), reference.swiglu(h), rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize(device)
