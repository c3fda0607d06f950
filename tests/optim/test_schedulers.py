"""Warm-up then linear/cosine/constant decay, checked point by point against the formulas."""
import math

import pytest
import torch

from megalite.optim.schedulers import LRScheduler


def make(style, warmup=10, decay=110, max_lr=1.0, min_lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return LRScheduler(optimizer, max_lr, min_lr, warmup, decay, style), optimizer


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_warmup_is_linear_from_the_first_step(style):
    sched, optimizer = make(style)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)   # step 1 of 10: max/10, not 0
    rates = [sched.lr_at(n) for n in range(1, 11)]
    assert rates == pytest.approx([n / 10 for n in range(1, 11)])


def test_linear_and_cosine_reach_min_lr_at_decay_iters():
    lin, _ = make("linear")
    cos, _ = make("cosine")
    # n - 1 = 60 steps done: halfway through the 100-step decay.
    assert lin.lr_at(61) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos.lr_at(61) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos.lr_at(36) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    for sched in (lin, cos):
        assert sched.lr_at(11) == pytest.approx(1.0)       # right after warm-up: max
        assert sched.lr_at(111) == pytest.approx(0.1)      # after decay_iters steps: min
        assert sched.lr_at(500) == pytest.approx(0.1)
        rates = [sched.lr_at(n) for n in range(11, 112)]
        assert all(a >= b for a, b in zip(rates, rates[1:]))  # monotone decay


def test_constant_stays_at_max():
    sched, _ = make("constant")
    assert [sched.lr_at(n) for n in (11, 50, 110, 1000)] == [1.0] * 4


def test_step_sets_optimizer_lr_and_state_round_trips():
    sched, optimizer = make("cosine", warmup=0, decay=20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)   # no warm-up: the first step runs at max
    for _ in range(7):
        sched.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(sched.lr_at(8))
    other, other_opt = make("cosine", warmup=0, decay=20)
    other.load_state_dict(sched.state_dict())
    assert other_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="a warm-up of 30 steps exceeds the decay's 20 steps"):
        make("linear", warmup=30, decay=20)
    with pytest.raises(ValueError, match="choose one of linear, cosine, constant"):
        make("wsd")
