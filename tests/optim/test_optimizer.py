"""MegaliteOptimizer: AdamW semantics, parameter groups, clipping over the grid, checkpoints."""
import copy

import pytest
import torch
import torch.nn.functional as F

from megalite.optim import build_optimizer
from megalite.parallel.data_parallel import DistributedDataParallel
from megalite.parallel.grads import finalize_model_grads
from megalite.parallel.param_info import ParamInfo, mark_shared_embedding, set_param_info
from megalite.parallel.state import initialize_grid
from megalite.parallel.testing import run_on_ranks
from tests.parallel.test_data_parallel import ToyMLP, flat_params, opt_config, toy_batch, train_toy


def test_matches_torch_adamw_with_no_decay_on_1d_params():
    ours, theirs = ToyMLP(), ToyMLP()
    optimizer = build_optimizer([ours], opt_config(clip_grad=0.0), None)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(p.dim() > 1 for p in optimizer.param_groups[0]["params"])
    assert all(p.dim() == 1 for p in optimizer.param_groups[1]["params"])
    reference = torch.optim.AdamW([{"params": [p for p in theirs.parameters() if p.dim() > 1], "weight_decay": 0.1},
                                   {"params": [p for p in theirs.parameters() if p.dim() == 1], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step in range(5):
        x, y = toy_batch(step)
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    # Same math, different fused/unfused op order: a few ulp per step.
    torch.testing.assert_close(flat_params(ours), flat_params(theirs), rtol=0, atol=1e-6)


def test_step_uses_the_lr_written_into_param_groups():
    model = ToyMLP()
    optimizer = build_optimizer([model], opt_config(), None)
    optimizer.param_groups[1]["lr"] = 0.0  # as the scheduler would write it
    before = [p.detach().clone() for p in optimizer.param_groups[1]["params"]]
    x, y = toy_batch(0)
    F.mse_loss(model(x), y).backward()
    assert optimizer.step()[0]
    assert all(torch.equal(b, p) for b, p in zip(before, optimizer.param_groups[1]["params"]))


def test_clipping_reports_the_unclipped_norm_and_clips_to_max():
    model, reference = ToyMLP(), ToyMLP()
    x, y = toy_batch(0)
    F.mse_loss(model(x), y).backward()
    F.mse_loss(reference(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5).item()
    assert expected > 0.5  # so clipping is active
    stepped, norm = build_optimizer([model], opt_config(clip_grad=0.5), None).step()
    assert stepped and norm == pytest.approx(expected, rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert clipped.item() == pytest.approx(0.5, rel=1e-5)


def test_fp32_and_bf16_do_not_scale_the_loss():
    for config in (opt_config(), opt_config(bf16=True)):
        optimizer = build_optimizer([ToyMLP()], config, None)
        loss = torch.tensor(2.5)
        assert optimizer.loss_scale == 1.0 and optimizer.scale_loss(loss) is loss


def _grid_norm(rank, world_size, zero):
    """TP=2 x PP=2 (x DP=2 with ZeRO-1): the global norm counts TP-replicated and tied params once."""
    grid = initialize_grid(tp=2, pp=2)
    stage = torch.nn.Module()
    stage.tied = torch.nn.Parameter(torch.zeros(4, 3))
    mark_shared_embedding(stage.tied)
    stage.norm = torch.nn.Parameter(torch.zeros(5))
    stage.shard = torch.nn.Parameter(torch.zeros(2, 3))
    set_param_info(stage.shard, ParamInfo(partition_dim=0))
    model = DistributedDataParallel(stage, grid, use_distributed_optimizer=zero)
    # Grads equal where the model says they are copies (tied: all ranks; norm: over TP), distinct per
    # TP and PP rank for the shard; equal over DP so the DP average leaves them unchanged.
    loss = (1.0 * stage.tied.sum() + (2.0 + grid.pp_rank) * stage.norm.sum()
            + (3.0 + grid.tp_rank + 10 * grid.pp_rank) * stage.shard.sum())
    loss.backward()
    finalize_model_grads([model], grid)  # the tied grads become 1 + 1 = 2 (summed over PP)
    _, norm = build_optimizer([model], opt_config(use_distributed_optimizer=zero), grid).step()
    return norm


@pytest.mark.parametrize("zero", [False, True])
def test_grad_norm_counts_every_parameter_of_the_grid_once(zero):
    tied = 12 * 2.0 ** 2                                   # one copy, grad 2 after the PP sum
    norms = 5 * (2.0 ** 2 + 3.0 ** 2)                      # one copy per pipeline stage
    shards = 6 * sum((3.0 + tp + 10 * pp) ** 2 for tp in range(2) for pp in range(2))
    expected = (tied + norms + shards) ** 0.5
    for norm in run_on_ranks(_grid_norm, 8 if zero else 4, zero):
        assert norm == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_state_dict_resumes_exactly(precision):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = opt_config(bf16=precision == "bf16")
    straight = ToyMLP(dtype=dtype)
    train_toy(straight, build_optimizer([straight], config, None), None, accumulation=1, steps=5)

    first = ToyMLP(dtype=dtype)
    optimizer = build_optimizer([first], config, None)
    train_toy(first, optimizer, None, accumulation=1, steps=3)
    saved_model, saved_state = copy.deepcopy(first.state_dict()), copy.deepcopy(optimizer.state_dict())
    if precision == "bf16":
        assert "master" in saved_state["pieces"][0]  # the fp32 masters carry bits the bf16 model lacks

    resumed = ToyMLP(dtype=dtype, seed=7)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    optimizer = build_optimizer([resumed], config, None)
    optimizer.load_state_dict(saved_state)
    train_toy(resumed, optimizer, None, accumulation=1, steps=2, first_step=3)
    assert optimizer.num_steps == 5
    assert torch.equal(flat_params(resumed), flat_params(straight))


def test_load_state_dict_refuses_another_layout():
    optimizer = build_optimizer([ToyMLP()], opt_config(), None)
    other = build_optimizer([ToyMLP(unused=True)], opt_config(), None)
    with pytest.raises(ValueError, match="another model or parallel layout"):
        optimizer.load_state_dict(other.state_dict())
