"""--grad-reduce-in-bf16: DDP's collective runs in bfloat16 (each rank's averaged term and the sum rounded to
bf16), all-reduce and ZeRO-1 reduce-scatter alike; fp32 stays the default."""
import pytest
import torch

from megalite.parallel.data_parallel import DistributedDataParallel
from megalite.parallel.state import initialize_grid
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args


def _grads(rank):
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(10 + rank)) * (1 + 1e-3 * rank)


def _reduce(rank, world_size, reduce_dtype, zero):
    grid = initialize_grid()
    model = DistributedDataParallel(torch.nn.Linear(16, 64, bias=False), grid, use_distributed_optimizer=zero,
                                    reduce_dtype=reduce_dtype)
    model.module.weight.main_grad.copy_(_grads(rank))
    model.finish_grad_sync()
    _, start, end = next(model.owned_ranges()) if zero else (None, 0, 64 * 16)
    return model.module.weight.main_grad.reshape(-1)[start:min(end, 64 * 16)].clone(), start


@pytest.mark.parametrize("zero", [False, True], ids=["all-reduce", "ZeRO-1 reduce-scatter"])
def test_the_reduction_is_rounded_to_bf16(zero):
    halves = [(_grads(r) / 2).reshape(-1) for r in range(2)]
    in_bf16 = (halves[0].bfloat16().float() + halves[1].bfloat16().float()).bfloat16().float()
    in_fp32 = halves[0] + halves[1]
    assert (in_bf16 - in_fp32).abs().max() > 1e-4      # the two are told apart
    for reduce_dtype, expected in ((torch.bfloat16, in_bf16), (torch.float32, in_fp32)):
        for got, start in run_on_ranks(_reduce, 2, reduce_dtype, zero, timeout=60):
            assert torch.equal(got, expected[start:start + got.numel()]), reduce_dtype


def test_the_flag_needs_bf16():
    base = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2"]
    with pytest.raises(ValueError, match="--grad-reduce-in-bf16 takes effect only with --bf16"):
        parse_args(base + ["--grad-reduce-in-bf16"], world_size=1)
    assert parse_args(base + ["--bf16", "--grad-reduce-in-bf16"], world_size=1)[2].grad_reduce_in_bf16
