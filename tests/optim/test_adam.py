"""megalite.optim.adam (fused Adam/AdamW kernels) against torch.optim and the PyTorch reference.

Tolerance for trajectories: the kernels evaluate torch's formula in fp32 but may fuse a multiply-add
(FMA) or order a product differently, so each update can differ from torch's by ~1 ulp of the
parameter; over 20 steps of lr 1e-2 on values of size ~1 that stays below 20 * 2^-23 * 4 ~ 1e-5.
"""
import copy

import pytest
import torch

from megalite.optim.adam import FusedAdam, adam_step, adam_step_master, adam_step_master_reference

TRAJECTORY_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(1,), (7,), (65537,), (), (3, 5)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def two_groups(params, weight_decay):
    return [{"params": params[:3], "lr": 1e-2, "weight_decay": weight_decay},
            {"params": params[3:], "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_trajectory_matches_torch(cpu_isa, adam_w_mode, weight_decay):
    ours_params, torch_params = make_params(), make_params()
    ours = FusedAdam(two_groups(ours_params, weight_decay), betas=(0.9, 0.95), eps=1e-8, adam_w_mode=adam_w_mode)
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    peer = torch_cls(two_groups(torch_params, weight_decay), betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(ours_params, torch_params):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        peer.step()
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a.detach(), b.detach(), **TRAJECTORY_TOLERANCE)
    ours_state, torch_state = ours.state_dict()["state"], peer.state_dict()["state"]
    assert ours_state.keys() == torch_state.keys()
    for index, state in ours_state.items():
        assert state.keys() == torch_state[index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].item() == 20
        torch.testing.assert_close(state["exp_avg_sq"], torch_state[index]["exp_avg_sq"], **TRAJECTORY_TOLERANCE)


def test_state_dict_moves_between_fused_adam_and_torch(cpu_isa):
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    peer = torch.optim.AdamW(params, lr=1e-2)
    peer.step()
    ours = FusedAdam(make_params(), lr=1e-2)
    ours.load_state_dict(copy.deepcopy(peer.state_dict()))
    ours_params = ours.param_groups[0]["params"]
    for p, q in zip(ours_params, params):
        p.data.copy_(q.detach())
        p.grad = torch.ones_like(p)
    ours.step()
    peer.step()
    for p, q in zip(ours_params, params):
        torch.testing.assert_close(p.detach(), q.detach(), **TRAJECTORY_TOLERANCE)
        assert ours.state[p]["step"].item() == 2


def test_params_without_grad_are_left_alone(cpu_isa):
    params = make_params()
    frozen = params[1].detach().clone()
    ours = FusedAdam(params, lr=1e-2)
    for p in params:
        p.grad = None if p is params[1] else torch.ones_like(p)
    ours.step()
    assert torch.equal(params[1].detach(), frozen) and params[1] not in ours.state


def test_half_params_are_refused_with_the_fix():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="adam_step_master"):
        FusedAdam([p]).step()


# -- master-weight mode ---------------------------------------------------------------------------

def master_case(model_dtype, grad_dtype, grad_scale, seed=0):
    """Per-tensor lists: model params (half), scaled grads, fp32 masters and moments."""
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn(shape, generator=gen) for shape in SHAPES]
    model = [m.to(model_dtype) for m in masters]
    grads = [(torch.randn(m.shape, generator=gen) * grad_scale).to(grad_dtype) for m in masters]
    exp_avgs = [torch.rand(m.shape, generator=gen) * 0.1 for m in masters]
    exp_avg_sqs = [torch.rand(m.shape, generator=gen) * 0.01 for m in masters]
    return model, grads, masters, exp_avgs, exp_avg_sqs


HYPER = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0])
def test_master_step_matches_reference(cpu_isa, output_stores, model_dtype, grad_dtype, grad_scale):
    ours = master_case(model_dtype, grad_dtype, grad_scale)
    expected = copy.deepcopy(ours)
    found_inf = adam_step_master(*ours, **HYPER, grad_scale=grad_scale)
    expected_flag = torch.zeros(1)
    adam_step_master_reference(*expected, **HYPER, grad_scale=grad_scale, found_inf=expected_flag)
    assert found_inf.item() == 0 and expected_flag.item() == 0
    model, _, masters, exp_avgs, exp_avg_sqs = ours
    for got, want in zip(masters + exp_avgs + exp_avg_sqs, expected[2] + expected[3] + expected[4]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)   # one step: a few fp32 ulps
    for param, master in zip(model, masters):
        assert param.dtype == model_dtype
        assert torch.equal(param, master.to(model_dtype)), "model param must be its master rounded to nearest even"


@pytest.mark.parametrize("model_dtype,grad_scale", [(torch.bfloat16, 1.0), (torch.float16, 2.0 ** 12)])
def test_master_trajectory_matches_torch_adamw_on_fp32_masters(cpu_isa, output_stores, model_dtype, grad_scale):
    """20 steps against what a PyTorch user writes for mixed precision: unscale the half grads into
    fp32, torch.optim.AdamW on the fp32 masters, copy the masters into the half params.  Step 8 has
    an overflowed gradient: ours must raise the flag and write nothing; the peer skips that step."""
    gen = torch.Generator().manual_seed(4)
    masters0 = [torch.randn(shape, generator=gen) for shape in SHAPES]
    peer_masters = [torch.nn.Parameter(m.clone()) for m in masters0]

    def groups(params):
        return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]
    peer = torch.optim.AdamW(groups(peer_masters), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    masters = [m.clone() for m in masters0]
    model = [m.to(model_dtype) for m in masters]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters]
    step = 0
    for iteration in range(20):
        grads = [(torch.randn(m.shape, generator=gen) * grad_scale).to(model_dtype) for m in masters]
        if iteration == 7:
            grads[2].view(-1)[123] = float("nan")
        found_inf = torch.zeros(1)
        for lo, hi, weight_decay in ((0, 3, 0.1), (3, len(SHAPES), 0.0)):   # one call per group, as the optimizer
            adam_step_master(model[lo:hi], grads[lo:hi], masters[lo:hi], exp_avgs[lo:hi], exp_avg_sqs[lo:hi],
                             step=step + 1, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay,
                             grad_scale=grad_scale, found_inf=found_inf)
        if iteration == 7:
            assert found_inf.item() == 1.0
            continue
        assert found_inf.item() == 0.0
        step += 1
        for p, g in zip(peer_masters, grads):
            p.grad = g.float() / grad_scale     # a power-of-two scale: division and our multiply agree exactly
        peer.step()
    assert step == 19
    for ours, theirs, param in zip(masters, peer_masters, model):
        torch.testing.assert_close(ours, theirs.detach(), **TRAJECTORY_TOLERANCE)
        assert torch.equal(param, ours.to(model_dtype))
    for index, (exp_avg_sq, p) in enumerate(zip(exp_avg_sqs, peer_masters)):
        torch.testing.assert_close(exp_avg_sq, peer.state[p]["exp_avg_sq"], **TRAJECTORY_TOLERANCE)


def test_master_step_without_finite_check(cpu_isa):
    """check_finite=False (the caller proved the grads finite) updates exactly as the checked step,
    and really skips the check: an inf then reaches the weights and the flag stays down."""
    checked = master_case(torch.bfloat16, torch.float32, 1.0)
    unchecked = master_case(torch.bfloat16, torch.float32, 1.0)
    adam_step_master(*checked, **HYPER)
    assert adam_step_master(*unchecked, **HYPER, check_finite=False).item() == 0.0
    for got, want in zip(sum(unchecked, []), sum(checked, [])):
        assert torch.equal(got, want)
    unchecked[1][1][3] = float("inf")
    assert adam_step_master(*unchecked, **{**HYPER, "step": 4}, check_finite=False).item() == 0.0
    assert not torch.isfinite(unchecked[2][1][3])


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_grad_skips_the_whole_step(cpu_isa, grad_dtype):
    ours = master_case(torch.float16, grad_dtype, 512.0)
    ours[1][2].view(-1)[40000] = float("inf")      # deep inside the 65537-element tensor
    before = copy.deepcopy(ours)
    found_inf = torch.zeros(1)
    returned = adam_step_master(*ours, **HYPER, grad_scale=512.0, found_inf=found_inf)
    assert returned is found_inf and found_inf.item() == 1.0
    for got, want in zip(sum(ours, []), sum(before, [])):
        assert torch.equal(got, want), "a step with an inf/nan gradient must write nothing"


def test_overflow_from_unscaling_is_caught(cpu_isa):
    """grad_scale < 1 multiplies: a finite fp32 grad of 3e38 * 2 overflows and must raise the flag."""
    ours = master_case(torch.bfloat16, torch.float32, 1.0)
    ours[1][0].fill_(3e38)
    assert adam_step_master(*ours, **HYPER, grad_scale=0.5).item() == 1.0


def test_raised_flag_skips_the_step_on_entry(cpu_isa):
    ours = master_case(torch.bfloat16, torch.bfloat16, 1.0)
    before = copy.deepcopy(ours)
    adam_step_master(*ours, **HYPER, found_inf=torch.ones(1))
    for got, want in zip(sum(ours, []), sum(before, [])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_model_params_round_to_nearest_even_like_torch(cpu_isa, output_stores, model_dtype):
    """lr=0 leaves the masters as they are, so the written params must equal torch's rounding of them:
    random values across the format's range, halfway ties, subnormals, overflow, inf and nan."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-30, 20, (20000,), generator=gen).float())
    one = torch.tensor(1.0)
    ulp = (torch.finfo(model_dtype).eps / 2)
    ties = torch.tensor([1 + ulp, 1 + 3 * ulp, -(1 + ulp), 65504.0, 65519.0, 65520.0, 1e5, 3e-8, 2.9e-8, 6e-5, 1e-40,
                         float("inf"), float("-inf"), float("nan"), 0.0, -0.0]) * one
    # The ties first: in the first whole 64-byte line, which the AVX-512 table rounds with one
    # instruction that flushes subnormals (1e-40) unless the kernel catches them; after the 20000
    # random values they would fall in the element-wise tail.
    masters = [torch.cat([ties, wide])]
    model = [torch.empty(masters[0].shape, dtype=model_dtype)]
    zeros = [torch.zeros_like(masters[0])]
    found_inf = adam_step_master(model, [torch.zeros_like(masters[0])], masters, zeros, [torch.zeros_like(zeros[0])],
                                 step=1, lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    assert found_inf.item() == 0
    torch.testing.assert_close(model[0], masters[0].to(model_dtype), rtol=0, atol=0, equal_nan=True)


def test_every_finite_fp16_gradient_is_read_exactly(cpu_isa):
    """exp_avg after one step from zero is (1 - beta1) * g: checks the fp16 -> fp32 load of all
    63,488 finite fp16 values (normals, subnormals, both zeros)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    grads = bits.view(torch.float16)
    grads = grads[torch.isfinite(grads)].clone()
    n = grads.numel()
    masters, exp_avgs, exp_avg_sqs = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    adam_step_master([torch.zeros(n, dtype=torch.bfloat16)], [grads], [masters], [exp_avgs], [exp_avg_sqs],
                     step=1, lr=0.0, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.0)
    assert torch.equal(exp_avgs, grads.float() * 0.5)     # 0.5 * g is exact in fp32


def test_master_mode_refuses_mismatched_lists():
    model, grads, masters, exp_avgs, exp_avg_sqs = master_case(torch.bfloat16, torch.bfloat16, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        adam_step_master(model, grads[:-1], masters, exp_avgs, exp_avg_sqs, **HYPER)
    with pytest.raises(TypeError, match=r"master_params\[0\] has dtype torch.bfloat16"):
        adam_step_master(model, grads, model, exp_avgs, exp_avg_sqs, **HYPER)
    with pytest.raises(ValueError, match="grad_scale 0.0"):
        adam_step_master(model, grads, masters, exp_avgs, exp_avg_sqs, **HYPER, grad_scale=0.0)
    with pytest.raises(ValueError, match=r"model_params\[5\].*not contiguous"):
        adam_step_master(model + [torch.zeros(3, 2, dtype=torch.bfloat16).t()], grads + [torch.zeros(6).bfloat16()],
                         masters + [torch.zeros(6)], exp_avgs + [torch.zeros(6)], exp_avg_sqs + [torch.zeros(6)],
                         **HYPER)
    with pytest.raises(ValueError, match="found_inf is on meta but the other inputs are on cpu"):
        adam_step_master(model, grads, masters, exp_avgs, exp_avg_sqs, **HYPER,
                         found_inf=torch.zeros(1, device="meta"))


# -- adam_step's own checks ------------------------------------------------------------------------

def test_adam_step_refuses_bad_inputs():
    p = [torch.zeros(6)]
    with pytest.raises(ValueError, match=r"grads\[0\].*not contiguous"):
        adam_step(p, [torch.zeros(3, 2).t()], [torch.zeros(6)], [torch.zeros(6)], **HYPER)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is on meta"):
        adam_step(p, [torch.zeros(6)], [torch.zeros(6, device="meta")], [torch.zeros(6)], **HYPER)
    with pytest.raises(ValueError, match="different element counts"):
        adam_step(p, [torch.zeros(5)], [torch.zeros(6)], [torch.zeros(6)], **HYPER)
    with pytest.raises(ValueError, match="step 0"):
        adam_step(p, [torch.zeros(6)], [torch.zeros(6)], [torch.zeros(6)], **{**HYPER, "step": 0})


def test_adam_step_flat_pieces_match_whole_tensors(cpu_isa):
    """Pieces of one flat buffer (as ZeRO-1 hands them) update exactly as the whole tensor does."""
    gen = torch.Generator().manual_seed(2)
    whole = [torch.randn(1000, generator=gen) for _ in range(3)] + [torch.rand(1000, generator=gen)]  # v >= 0
    pieces = [[t[:333].clone(), t[333:].clone()] for t in whole]
    adam_step(*[[t] for t in whole], **HYPER)
    adam_step(*pieces, **HYPER)
    for t, parts in zip(whole, pieces):
        assert torch.equal(t, torch.cat(parts)) and not t.isnan().any()
