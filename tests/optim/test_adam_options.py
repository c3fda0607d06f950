"""FusedAdam with the options of a torch AdamW state (maximize honoured, amsgrad refused), its step
counts kept on the host, and the C++ Adam operators' own checks of step and grad_scale (a direct
torch.ops.megalite call bypasses megalite/optim/adam.py's)."""
import copy

import pytest
import torch

from megalite.ops import backend
from megalite.optim.adam import FusedAdam

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
needs_cpu_kernels = pytest.mark.skipif(not backend.native_available(torch.device("cpu")),
                                       reason="needs the megalite._C extension")


def params(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in [(7,), (65537,), (3, 5)]]


def run_both(ours, peer, ours_params, peer_params, steps=5):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours_params, peer_params):
            grad = torch.randn(a.shape, generator=gen).to(a.device)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        peer.step()
    for a, b in zip(ours_params, peer_params):
        torch.testing.assert_close(a.detach(), b.detach(), **TOLERANCE)


def test_maximize_matches_torch():
    ours_params, peer_params = params(), params()
    run_both(FusedAdam(ours_params, lr=1e-2, maximize=True), torch.optim.AdamW(peer_params, lr=1e-2, maximize=True),
             ours_params, peer_params)


def test_maximize_is_read_from_a_torch_state_dict():
    peer_params = params()
    peer = torch.optim.AdamW(peer_params, lr=1e-2, maximize=True)
    ours_params = params()
    ours = FusedAdam(ours_params, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(peer.state_dict()))
    assert ours.param_groups[0]["maximize"] is True
    run_both(ours, peer, ours_params, peer_params)


def test_amsgrad_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^FusedAdam has no AMSGrad[^\n]*$"):
        FusedAdam(params(), amsgrad=True)
    peer = torch.optim.AdamW(params(), amsgrad=True)
    ours = FusedAdam(params())
    with pytest.raises(ValueError, match=r"^FusedAdam has no AMSGrad[^\n]*$"):
        ours.load_state_dict(peer.state_dict())


def test_loaded_steps_are_host_scalars():
    peer_params = params()
    peer = torch.optim.AdamW(peer_params, lr=1e-2)
    for p in peer_params:
        p.grad = torch.ones_like(p)
    peer.step()
    state = copy.deepcopy(peer.state_dict())
    state["state"][0]["step"] = 1   # an older format: a Python number
    ours = FusedAdam(params(), lr=1e-2)
    ours.load_state_dict(state)
    for entry in ours.state.values():
        assert entry["step"].device.type == "cpu" and entry["step"].dtype == torch.float32
        assert entry["step"].item() == 1


@needs_cpu_kernels
def test_cpu_operators_check_step_and_grad_scale():
    t = [torch.zeros(4)]
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(RuntimeError, match="step 0 must be a positive integer"):
        torch.ops.megalite.adam_step(t, t, t, t, 0, *hyper)
    model = [torch.zeros(4, dtype=torch.bfloat16)]
    found_inf = torch.zeros(1)
    for scale in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="grad_scale .* must be a positive finite number"):
            torch.ops.megalite.adam_step_master(model, model, t, t, t, found_inf, 1, *hyper, scale, True)
    with pytest.raises(RuntimeError, match="step -3 must be a positive integer"):
        torch.ops.megalite.adam_step_master(model, model, t, t, t, found_inf, -3, *hyper, 1.0, True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not backend.native_available(torch.device("cuda")),
                    reason="needs a CUDA device and the megalite._cuda extension")
def test_steps_saved_on_the_gpu_cost_no_host_sync():
    """torch's fused AdamW keeps `step` on the GPU; FusedAdam moves it to the host once, at load, and
    then steps without synchronizing (the sync debug mode raises on any synchronizing call)."""
    peer_params = params("cuda")
    peer = torch.optim.AdamW(peer_params, lr=1e-2, fused=True)
    for p in peer_params:
        p.grad = torch.ones_like(p)
    peer.step()
    ours_params = params("cuda")
    ours = FusedAdam(ours_params, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(peer.state_dict()))
    for p in ours_params:
        p.grad = torch.ones_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(ours.state[p]["step"].device.type == "cpu" for p in ours_params)
    t = [torch.zeros(4, device="cuda")]
    with pytest.raises(RuntimeError, match="step 0 must be a positive integer"):
        torch.ops.megalite.adam_step(t, t, t, t, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
