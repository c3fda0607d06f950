"""MoE with expert tensor parallelism (--expert-tensor-parallel-size 2 = TP 2, sequence parallelism, EP 2, so DP 2
and expert-DP 1 on 4 ranks): each expert's ffn split over the TP group (fc1's columns, whole SwiGLU units, and
fc2's rows), the rows an EP rank receives gathered over expert TP and the partial outputs summed back.  One
training step's loss, gradient norm, logged auxiliary losses (and expert-bias update) and every parameter after
the step equal the hand computation and the one-rank run (tests/training/test_moe_tensor_parallel.py's
harness): both dispatchers, with and without --moe-grouped-gemm, GELU and SwiGLU experts, ZeRO-1 and ZeRO-3,
expert TP 2 at EP 1 (with full recompute, and with the router's expert bias), and on 8 ranks TP2 x CP2 x DP2
with EP2 (expert-DP 2, over CP x DP) and TP2 x PP2 x DP2 with EP2 (losses and norm there; the parameters are
compared where there is no pipeline)."""
import pytest
import torch

from megalite.parallel.testing import run_on_ranks
from tests.training.test_moe_tensor_parallel import BASE, TP, _step, assert_step_matches_one_rank
from tests.training.test_moe_training import ARGV, BIAS, _curve

ETP2 = TP + ["--expert-tensor-parallel-size", "2"]
EP2 = ["--expert-model-parallel-size", "2"]
ALLTOALL = ["--moe-token-dispatcher-type", "alltoall"]
SWIGLU = ["--swiglu", "--moe-grouped-gemm"]


@pytest.mark.parametrize("world_size, layout", [
    (4, ETP2 + EP2 + ALLTOALL),
    (4, ETP2 + EP2 + ALLTOALL + SWIGLU + ["--use-distributed-optimizer"]),
    (4, ETP2 + EP2 + SWIGLU),
    (4, ETP2 + EP2 + ["--swiglu", "--data-parallel-sharding-strategy", "optim_grads_params"]),
    (2, ETP2 + ALLTOALL + ["--swiglu", "--recompute-granularity", "full", "--recompute-method", "uniform"]),
    (2, ETP2 + ["--swiglu"] + BIAS),
    (8, ETP2 + EP2 + ["--context-parallel-size", "2"]),
    (8, ETP2 + EP2 + ALLTOALL + ["--pipeline-model-parallel-size", "2"])],
    ids=["TP=2 DP=2 EP=2 ETP=2 alltoall", "ETP=2 EP=2 alltoall SwiGLU grouped ZeRO-1",
         "ETP=2 EP=2 allgather SwiGLU grouped", "ETP=2 EP=2 allgather SwiGLU ZeRO-3",
         "TP=2 EP=1 ETP=2 alltoall full recompute", "TP=2 EP=1 ETP=2 allgather expert bias",
         "TP=2 CP=2 DP=2 EP=2 ETP=2 allgather", "TP=2 PP=2 DP=2 EP=2 ETP=2"])
def test_moe_step_with_expert_tensor_parallelism_matches_one_rank(world_size, layout):
    def ffn_split(params):   # the experts' ffn is split: weight1 [E/EP, h, f/2] and weight2 [E/EP, f/2, h]
        split = {name: dim for name, _, dim, expert in params if expert}
        assert split and all(dim in (1, 2) for dim in split.values()), split

    assert_step_matches_one_rank(world_size, BASE + layout, "--moe-router-enable-expert-bias" in layout, ffn_split)


@pytest.mark.parametrize("world_size, layout", [(4, ETP2 + EP2 + ALLTOALL + ["--use-distributed-optimizer"]),
                                                (2, ETP2)], ids=["TP=2 DP=2 EP=2 ETP=2 alltoall ZeRO-1",
                                                                 "TP=2 ETP=2 allgather"])
def test_expert_biases_train_the_same_under_expert_tensor_parallelism(world_size, layout):
    """Each expert's fc1 bias split as fc1's columns, its fc2 bias added once (by expert-TP rank 0) with its
    gradient summed over TP: zero at first, they move after the first step, so three steps check their
    forward too (tests/training/test_moe_training.py's curve: losses, grad norms, logged balancing loss)."""
    argv = [flag for flag in ARGV if flag != "--disable-bias-linear"] + ["--lr", "1e-2", "--train-iters", "3"]
    reference = run_on_ranks(_curve, 1, argv)[0]
    results = run_on_ranks(_curve_and_fc2_biases, world_size, argv + layout, timeout=180)
    for curve, _ in results:
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=1e-4, atol=0)
    # ranks 0 and 1 are the expert-TP pair of EP rank 0: their copies of the fc2 biases (only rank 0's is used)
    # stay equal, so a checkpoint may take either
    assert results[0][1] and all(torch.equal(results[0][1][name], results[1][1][name]) for name in results[0][1])
    assert all(bool(bias.abs().sum() > 0) for bias in results[0][1].values())


def _curve_and_fc2_biases(rank, world_size, argv):
    """_curve's three steps, and this rank's fc2 biases after them."""
    import megalite.training.loop as loop
    from megalite.parallel.data_parallel import unwrap_model
    runs, setup = [], loop.setup
    loop.setup = lambda args: runs.append(setup(args)) or runs[-1]    # (_curve imports it when it runs)
    curve = _curve(rank, world_size, argv)
    return curve, {name: param.detach().clone() for name, param in unwrap_model(runs[0].model[0]).named_parameters()
                   if name.endswith("experts.bias2")}


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_capacity_bounded_routing_drops_as_at_expert_tp_1(dispatcher):
    """Under TP + SP each rank's capacity is of its own tokens (megalite/model/moe/capacity.py), so one process is
    no reference; splitting the experts' ffn must not change what is dropped: TP2+SP x EP2 with expert TP 2 gives
    expert TP 1's loss, grad norm and logged aux losses, and both differ from the dropless step (pairs dropped)."""
    layout = BASE + TP + EP2 + ["--moe-token-dispatcher-type", dispatcher]
    capacity = ["--moe-expert-capacity-factor", "0.5", "--moe-token-drop-policy", "position"]
    etp1 = run_on_ranks(_step, 4, layout + capacity, timeout=240)
    etp2 = run_on_ranks(_step, 4, layout + capacity + ["--expert-tensor-parallel-size", "2"], timeout=240)
    dropless = run_on_ranks(_step, 4, layout, timeout=240)[0]
    for (loss1, norm1, logged1, *_), (loss2, norm2, logged2, *_) in zip(etp1, etp2):
        assert loss2 == pytest.approx(loss1, rel=1e-6) and norm2 == pytest.approx(norm1, rel=1e-5)
        assert logged2 == pytest.approx(logged1, rel=1e-6)
    assert abs(etp1[0][0] - dropless[0]) > 1e-4
