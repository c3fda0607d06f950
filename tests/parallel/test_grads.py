"""finalize_model_grads: DP average, sequence-parallel sum over TP, tied-embedding sum over PP.

Each rank of a TP=2 x DP=2 x PP=2 grid gets gradients that encode its coordinates, so the expected
result of every reduction is known in closed form.
"""
import torch
import torch.nn as nn

from megalite.parallel.data_parallel import DistributedDataParallel
from megalite.parallel.grads import finalize_model_grads
from megalite.parallel.param_info import ParamInfo, mark_shared_embedding, set_param_info
from megalite.parallel.state import initialize_grid
from megalite.parallel.testing import run_on_ranks


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.tied = nn.Parameter(torch.zeros(3, 2))       # word embedding (pp 0) / output layer (pp 1)
        mark_shared_embedding(self.tied)
        self.norm = nn.Parameter(torch.zeros(2))           # TP-replicated, fed a sequence shard
        set_param_info(self.norm, ParamInfo(sequence_parallel=True))
        self.shard = nn.Parameter(torch.zeros(2, 2))       # a TP shard
        set_param_info(self.shard, ParamInfo(partition_dim=0))


def coded_grad(index, tp, dp, pp):
    """The local gradient of parameter ``index`` on rank (tp, dp, pp)."""
    return (index + 1) * (1.0 + tp + 10.0 * dp + 100.0 * pp)


def expected_grads(tp, pp, dp_size=2, tp_size=2, pp_size=2):
    def dp_mean(index, tp_, pp_):
        return sum(coded_grad(index, tp_, d, pp_) for d in range(dp_size)) / dp_size
    tied = sum(dp_mean(0, tp, p) for p in range(pp_size))        # summed over first and last stage
    norm = sum(dp_mean(1, t, pp) for t in range(tp_size))         # summed over TP
    shard = dp_mean(2, tp, pp)                                    # only averaged over DP
    return [tied, norm, shard]


def _finalize(rank, world_size):
    grid = initialize_grid(tp=2, pp=2)
    coords = (grid.tp_rank, grid.dp_rank, grid.pp_rank)
    results = {}
    for wrapped in (False, True):
        stage = Stage()
        model = DistributedDataParallel(stage, grid, bucket_size=4, overlap_grad_reduce=True) if wrapped else stage
        # loss = sum_i c_i * sum(p_i) gives every element of p_i the grad c_i.
        loss = sum(coded_grad(i, *coords) * p.sum() for i, p in enumerate(stage.parameters()))
        loss.backward()
        finalize_model_grads([model], grid)
        grads = [p.main_grad if wrapped else p.grad for p in stage.parameters()]
        assert all(torch.all(g == g.reshape(-1)[0]) for g in grads)  # every element reduced alike
        results[wrapped] = [g.reshape(-1)[0].item() for g in grads]
    return (grid.tp_rank, grid.pp_rank), results


def test_finalize_reduces_dp_tp_and_embedding_grads():
    for (tp, pp), results in run_on_ranks(_finalize, 8):
        expected = expected_grads(tp, pp)
        assert results[False] == expected, f"plain module at tp={tp} pp={pp}"
        assert results[True] == expected, f"DDP module at tp={tp} pp={pp}"


def _single_stage(rank, world_size):
    grid = initialize_grid(tp=1, pp=1)  # PP=1, TP=1: nothing to sum beyond DP; tied grads left alone
    stage = Stage()
    loss = sum((i + 1.0) * p.sum() for i, p in enumerate(stage.parameters()))
    loss.backward()
    finalize_model_grads([stage], grid)
    return [p.grad.reshape(-1)[0].item() for p in stage.parameters()]


def test_single_rank_grads_are_untouched():
    assert run_on_ranks(_single_stage, 1)[0] == [1.0, 2.0, 3.0]


def _tied_embedding_under_zero1(rank, world_size):
    """PP=2 x DP=2, ZeRO-1: the stages hold different parameters around the tied one, so only a
    bucket of its own makes both stages shard it alike (else the shard-to-shard sum mixes elements)."""
    from megalite.config.settings import OptimizerConfig
    from megalite.optim import build_optimizer
    grid = initialize_grid(pp=2)
    stage = nn.Module()
    if grid.pp_rank == 0:
        stage.tied = nn.Parameter(torch.ones(40, 4))   # word embedding, registered first
        stage.other = nn.Parameter(torch.zeros(70))
    else:
        stage.other = nn.Parameter(torch.zeros(50, 3))
        stage.tied = nn.Parameter(torch.ones(40, 4))   # output layer, registered last
    mark_shared_embedding(stage.tied)
    model = DistributedDataParallel(stage, grid, bucket_size=10 ** 6, use_distributed_optimizer=True)
    loss = (1.0 + 10 * grid.dp_rank + 100 * grid.pp_rank) * stage.tied.sum() + stage.other.sum()
    loss.backward()
    finalize_model_grads([model], grid)
    optimizer = build_optimizer([model], OptimizerConfig(lr=0.1, use_distributed_optimizer=True), grid)
    (piece,) = [p for p in optimizer.all_pieces() if p.param is stage.tied]
    owned_grads = piece.grad().clone()
    optimizer.step()
    return owned_grads, stage.tied.detach().clone()


def test_tied_embedding_grads_and_weights_agree_under_zero1():
    results = run_on_ranks(_tied_embedding_under_zero1, 4)
    # DP means 6 (first stage) and 106 (last stage), summed over the embedding group.
    for owned_grads, _ in results:
        assert owned_grads.numel() > 0 and torch.all(owned_grads == 112.0)
    for _, tied in results:
        assert torch.equal(tied, results[0][1]) and not torch.equal(tied, torch.ones(40, 4))
