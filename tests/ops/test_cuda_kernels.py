"""The CUDA kernels (megalite._cuda) against the references.  Skipped without a CUDA device or
without the built extension; the tolerances are those of the CPU tests (same arithmetic in fp32).

The norms have two CUDA paths (csrc/cuda/norms.cu): rows of whole 16-byte packs up to 8192 columns
at aligned addresses take the register-cached kernels, everything else the general ones; the
shapes below cover both (4096 and 1024 columns cached; 77, 129, 8195 general; 8192 the cached
limit; 8200 just past it) and offsets that break the alignment of an otherwise cached shape.
Adam's kernels move 4 elements per thread with one vector instruction where a tensor is aligned
and fall back to scalar steps for unaligned views and the last numel % 4 elements."""
import copy

import pytest
import torch

from megalite.ops import backend, layer_norm, reference, rms_norm, swiglu
from megalite.optim.adam import adam_step, adam_step_master, adam_step_master_reference, adam_step_reference
from tests.ops.cuda_checks import no_pending_cuda_error  # noqa: F401 (autouse fixture)
from tests.ops.test_norms import DTYPES, make_inputs, run_with_grads, tolerance

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not backend.native_available(torch.device("cuda")),
                                 reason="needs a CUDA device and the megalite._cuda extension")]


@pytest.mark.parametrize("shape", [(1, 7), (33, 77), (3, 4, 129), (1000, 64), (16, 4096), (2, 8195),
                                   (300, 1024), (3, 8192), (5, 8200), (2000, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp32_weight", [False, True])
def test_norms_match_reference(shape, dtype, fp32_weight):
    x, dy, weight, bias = make_inputs(shape, dtype, torch.float32 if fp32_weight else dtype)
    x, dy, weight, bias = (t.cuda() for t in (x, dy, weight, bias))
    cases = [(lambda a, w, b: layer_norm(a, w, b, 1e-5), lambda a, w, b: reference.layer_norm(a, w, b, 1e-5), bias),
             (lambda a, w, b: rms_norm(a, w, 1e-5), lambda a, w, b: reference.rms_norm(a, w, 1e-5), None)]
    for ours_fn, reference_fn, maybe_bias in cases:
        ours = run_with_grads(ours_fn, x, weight, maybe_bias, dy)
        expected = run_with_grads(reference_fn, x, weight, maybe_bias, dy)
        for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, expected):
            torch.testing.assert_close(got.float(), want.float(), **tolerance(name, dtype, x))


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values at `offset` elements past an allocation's (aligned) start: a contiguous view whose
    address is not 16-byte aligned when offset * itemsize is not a multiple of 16."""
    buffer = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    view = buffer[offset:].view(t.shape)
    view.copy_(t)
    return view


NORMS = {"layer_norm": (lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)),
         "rms_norm": (lambda x, w, b: rms_norm(x, w, 1e-5), lambda x, w, b: reference.rms_norm(x, w, 1e-5))}


@pytest.mark.parametrize("offset", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_norms_at_unaligned_addresses(norm, offset, dtype):
    """x, dy and the weights at element offsets (1024 columns, a cached shape): offsets 1 and 2 break
    the 16-byte alignment and must send the launcher to the general kernels; offset 4 keeps it for
    fp32 (the cached kernels at an offset) and breaks it for bf16.  The leaves are the misaligned
    views themselves (run_with_grads would clone them into fresh, aligned memory)."""
    ours_fn, reference_fn = NORMS[norm]
    x, dy, weight, bias = make_inputs((64, 1024), dtype, dtype)
    bias = bias if norm == "layer_norm" else None
    leaves = [misaligned(t.cuda(), offset).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ours_fn(*leaves).backward(misaligned(dy.cuda(), offset))
    ours = [ours_fn(*leaves).detach()] + [t.grad for t in leaves if t is not None]
    expected = run_with_grads(reference_fn, x.cuda(), weight.cuda(), bias.cuda() if bias is not None else None,
                              dy.cuda())
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), ours, expected):
        torch.testing.assert_close(got.float(), want.float(), **tolerance(name, dtype, x))


@pytest.mark.parametrize("shape, offset, path", [((16, 4096), 0, "cached"), ((300, 1024), 0, "cached"),
                                                 ((300, 1024), 1, "general"), ((5, 8200), 0, "general")])
def test_norm_launcher_takes_the_expected_path(shape, offset, path):
    """Which kernels ran, by name in the profiler: the register-cached ones for aligned rows of whole
    packs up to 8192 columns, the general ones otherwise (a wrong choice would still be correct,
    and only slow, so the other tests cannot see it)."""
    from torch.profiler import ProfilerActivity, profile
    x, dy, weight, bias = make_inputs(shape, torch.bfloat16, torch.bfloat16)
    leaves = [misaligned(t.cuda(), offset).requires_grad_() for t in (x, weight, bias)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer_norm(*leaves, 1e-5).backward(misaligned(dy.cuda(), offset))
        torch.cuda.synchronize()
    names = " ".join(event.key for event in prof.key_averages())
    cached = "cached_forward_kernel" in names and "cached_backward_kernel" in names
    general = "norm_forward_kernel" in names and "norm_backward_dx_kernel" in names
    assert (cached, general) == ((True, False) if path == "cached" else (False, True)), names


def test_adam_many_small_and_unaligned_tensors():
    """148 tensors of odd sizes (GPT-2 small's count), some at misaligned offsets: vector and scalar
    paths inside one launch, every tail length 0..3."""
    gen = torch.Generator().manual_seed(2)
    sizes = [1 + (7 * i) % 1031 for i in range(144)] + [4, 5, 6, 7]
    lists = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(3)] + [[torch.rand(n, generator=gen)
                                                                                   for n in sizes]]
    expected = copy.deepcopy(lists)
    hyper = dict(step=2, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    on_gpu = [[misaligned(t.cuda(), (i + role) % 3) for i, t in enumerate(tensors)]
              for role, tensors in enumerate(lists)]
    adam_step(*on_gpu, **hyper)
    adam_step_reference(*expected, **hyper)
    for got, want in zip(sum(on_gpu, []), sum(expected, [])):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


def test_adam_multi_tensor_apply_covers_every_chunk():
    """More tensors (30) than one launch holds (24) and more chunks than its blocks (320)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 7, 65536 * 11 + 5, 0] + [65536 * 13 + 3] * 26
    lists = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(3)] + [[torch.rand(n, generator=gen)
                                                                                   for n in sizes]]
    expected = copy.deepcopy(lists)
    hyper = dict(step=4, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    on_gpu = [[t.cuda() for t in role] for role in lists]
    adam_step(*on_gpu, **hyper)
    adam_step_reference(*expected, **hyper)
    for got, want in zip(sum(on_gpu, []), sum(expected, [])):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)   # FMA, flushed denormals: a few ulps


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_master_step_and_inf_skip(grad_dtype):
    gen = torch.Generator().manual_seed(1)
    masters = [torch.randn(n, generator=gen) for n in (5, 70000, 65536 * 2 + 3)]
    case = [[m.to(torch.bfloat16) for m in masters], [(torch.randn(m.shape, generator=gen) * 64).to(grad_dtype)
                                                      for m in masters],
            masters, [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters]]
    hyper = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=64.0)
    expected = copy.deepcopy(case)
    on_gpu = [[t.cuda() for t in role] for role in case]
    found_inf = adam_step_master(*on_gpu, **hyper, found_inf=torch.zeros(1, device="cuda"))
    adam_step_master_reference(*expected, **hyper, found_inf=torch.zeros(1))
    assert found_inf.item() == 0
    for got, want in zip(on_gpu[2], expected[2]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    for param, master in zip(on_gpu[0], on_gpu[2]):
        assert torch.equal(param, master.to(torch.bfloat16))
    before = [[t.clone() for t in role] for role in on_gpu]
    on_gpu[1][1][12345] = float("nan")
    assert adam_step_master(*on_gpu, **hyper).item() == 1.0
    for role in (0, 2, 3, 4):   # params, masters and moments untouched: the step is all or nothing
        assert all(torch.equal(a, b) for a, b in zip(on_gpu[role], before[role]))


SWIGLU_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
                    torch.float16: dict(rtol=1e-3, atol=1e-5)}


@pytest.mark.parametrize("shape", [(1, 2), (33, 14), (3, 4, 2048), (1000, 2 * 1376), (7, 2 * 4097)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_swiglu_matches_reference(shape, dtype, offset):
    """csrc/cuda/swiglu.cu against reference.swiglu, forward and backward.  The reference runs in fp32
    and is rounded once to the kernel's dtype -- the kernel's own arithmetic -- so fp32 agrees to
    round-off and bf16/fp16 to one unit in the last place (2^-7 and 2^-10 relative).
    Offset 1 moves h and dy off their 16-byte alignment (the scalar path); odd pair counts leave a
    tail after the vector steps."""
    torch.manual_seed(0)
    h = misaligned(torch.randn(shape, dtype=dtype, device="cuda"), offset).requires_grad_()
    want_h = h.detach().float().clone().requires_grad_()
    ours, want = swiglu(h), reference.swiglu(want_h)
    dy = misaligned(torch.randn(want.shape, dtype=dtype, device="cuda"), offset)
    (grad,) = torch.autograd.grad(ours, h, dy)
    (want_grad,) = torch.autograd.grad(want, want_h, dy.float())
    close = SWIGLU_TOLERANCE[dtype]
    torch.testing.assert_close(ours, want.to(dtype), **close)
    torch.testing.assert_close(grad, want_grad.to(dtype), **close)
