"""The CUDA kernels (megalite._cuda) against the references.  Skipped without a CUDA device or
without the built extension; the tolerances are those of the CPU tests (same arithmetic in fp32)."""
import copy

import pytest
import torch

from megalite.ops import backend, layer_norm, reference, rms_norm
from megalite.optim.adam import adam_step, adam_step_master, adam_step_master_reference, adam_step_reference
from tests.ops.test_norms import DTYPES, make_inputs, run_with_grads, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not backend.native_available(torch.device("cuda")),
                                reason="needs a CUDA device and the megalite._cuda extension")


@pytest.mark.parametrize("shape", [(1, 7), (33, 77), (3, 4, 129), (1000, 64), (16, 4096), (2, 8195)])
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
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)   # fast-math sqrt/div: a few ulps


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_master_step_and_inf_skip(grad_dtype):
    gen = torch.Generator().manual_seed(1)
    masters = [torch.randn(n, generator=gen) for n in (5, 70000)]
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
    before = [t.clone() for t in sum(on_gpu, [])]
    on_gpu[1][1][12345] = float("nan")
    assert adam_step_master(*on_gpu, **hyper).item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(sum(on_gpu, [])[:2] + sum(on_gpu, [])[4:], before[:2] + before[4:]))
