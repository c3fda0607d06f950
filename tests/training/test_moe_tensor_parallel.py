"""MoE under tensor parallelism (TP=2 with sequence parallelism, expert TP 1): one training step's loss, gradient
norm, logged auxiliary losses and expert-bias update equal the hand computation on one process
(tests/training/test_moe_training.py's), and every parameter after the step equals the one-rank run's -- its TP
shard, or its EP rank's experts.  The TP ranks route their own s/t tokens: the router's gradient is summed over
TP, the balancing loss's loads (each sequence's, for seq_aux_loss) over TP (x CP), the experts' gradients over
the expert-data-parallel group that the TP ranks join.  Layouts: TP2 with EP 1, 2 and 4, DP2, CP2, ZeRO-1,
ZeRO-3, full recompute, seq_aux_loss and PP2 (8 ranks; the parameters are compared where there is no pipeline
here, and at TP2 x PP2 x DP2 with EP2 by tests/training/test_moe_parity.py)."""
import pytest
import torch

from megalite.parallel.testing import run_on_ranks
from tests.training.test_moe_training import ARGV, BIAS, _batch, by_hand

# --make-vocab-size-divisible-by 32: the vocabulary is 64 at TP=1 and TP=2 alike (no padding rows at either).
# --adam-eps 1e-4: Adam's first step is lr g / (|g| + eps), so a gradient that cancels to ~1e-8 would turn its
# float32 round-off (~1e-7 of the terms summed) into a visible step; with eps 1e-4 that error stays ~lr 1e-5.
BASE = ARGV + ["--make-vocab-size-divisible-by", "32", "--lr", "1e-2", "--adam-eps", "1e-4",
               "--moe-shared-expert-intermediate-size", "8", "--moe-shared-expert-gate"]
TP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
ALLTOALL = ["--moe-token-dispatcher-type", "alltoall"]
SEQ_AUX = ["--moe-router-load-balancing-type", "seq_aux_loss"]
LAYOUT_FLAGS = {"--tensor-model-parallel-size": 1, "--sequence-parallel": 0, "--expert-model-parallel-size": 1,
                "--expert-tensor-parallel-size": 1,
                "--pipeline-model-parallel-size": 1, "--context-parallel-size": 1, "--use-distributed-optimizer": 0,
                "--data-parallel-sharding-strategy": 1}


def one_rank(argv):
    """``argv`` without its layout (TP, SP, EP, PP, ZeRO-1): the same model and step on one process."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in LAYOUT_FLAGS:
            skip = LAYOUT_FLAGS[arg]
        else:
            kept.append(arg)
    return kept


def _step(rank, world_size, argv):
    """One step of the real loop; (loss, grad norm, logged aux losses, expert biases, this rank's parameters as
    (name, tensor, TP partition dim, whether an expert stack) with its TP and EP rank) -- parameters only
    without a pipeline (the names are the one-stage model's)."""
    from megalite.model.moe.router import TopKRouter
    from megalite.parallel.context_parallel import split_for_context_parallel
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.parallel.param_gather import whole_parameters
    from megalite.parallel.param_info import param_info
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    per_rank, dp_rank, cp = 4 // run.grid.dp_size, run.grid.dp_rank, run.grid.cp_size
    run.train_iter = iter([split_for_context_parallel(_batch(i), cp, run.grid.cp_rank)
                           for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)])
    record = train_step(run)
    biases = {m.layer_number: m.expert_bias.tolist() for chunk in run.model for m in chunk.modules()
              if isinstance(m, TopKRouter) and m.expert_bias is not None}
    with whole_parameters(run.model):   # (ZeRO-3 holds them dropped between steps)
        params = [] if run.grid.pp_size > 1 else [
            (name, param.detach().float().clone(), param_info(param).partition_dim, param_info(param).expert_parallel)
            for name, param in unwrap_model(run.model[0]).named_parameters()]
    return (record["loss"], record["grad_norm"], [record["load_balancing_loss"], record["z_loss"]], biases,
            (params, run.grid.tp_rank, run.grid.tp_size, run.grid.ep_rank, run.grid.ep_size))


def assert_same_parameters(got, reference):
    params, tp_rank, tp, ep_rank, ep = got
    whole = {name: tensor for name, tensor, _, _ in reference[0]}
    assert params and len(params) == len(whole)
    for name, tensor, partition_dim, expert in params:
        expected = whole[name]
        if partition_dim is not None:
            expected = expected.chunk(tp, partition_dim)[tp_rank]
        if expert:
            expected = expected.chunk(ep, 0)[ep_rank]
        # float32 round-off of one Adam step (lr 1e-2) from gradients summed in another order
        torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world_size, layout", [
    (2, TP + BIAS), (2, TP + ALLTOALL + ["--expert-model-parallel-size", "2"]),
    (2, TP + ALLTOALL + ["--expert-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method",
                         "uniform"]),
    (4, TP + ["--expert-model-parallel-size", "2"]),
    (4, TP + ALLTOALL + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
    (4, TP + ALLTOALL + ["--expert-model-parallel-size", "4"] + BIAS),
    (4, TP + ["--context-parallel-size", "2", "--expert-model-parallel-size", "2"] + BIAS),
    (4, TP + ALLTOALL + ["--expert-model-parallel-size", "2", "--data-parallel-sharding-strategy",
                         "optim_grads_params"]),
    (8, TP + ALLTOALL + ["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, TP + SEQ_AUX), (4, TP + SEQ_AUX + ["--context-parallel-size", "2", "--expert-model-parallel-size", "2"])],
    ids=["TP=2 EP=1 bias", "TP=2 EP=2", "TP=2 EP=2 full recompute",
         "TP=2 DP=2 EP=2 allgather", "TP=2 DP=2 EP=2 ZeRO-1", "TP=2 DP=2 EP=4 bias",
         "TP=2 CP=2 EP=2 bias", "TP=2 DP=2 EP=2 ZeRO-3", "TP=2 PP=2 DP=2 EP=2", "TP=2 seq_aux_loss",
         "TP=2 CP=2 EP=2 seq_aux_loss"])
def test_moe_step_under_tensor_parallelism_matches_one_rank(world_size, layout):
    assert_step_matches_one_rank(world_size, BASE + layout, "--moe-router-enable-expert-bias" in layout)


def assert_step_matches_one_rank(world_size, argv, has_bias, check_split=None):
    """One step at ``world_size`` ranks against the hand computation and the one-rank run: loss, grad norm,
    logged auxiliary losses, the expert-bias update (present exactly when ``has_bias``) and, without a pipeline,
    every parameter (``check_split(params)`` first, where given, on rank 0's parameter descriptions)."""
    loss, norm, logged, biases = by_hand(one_rank(argv))
    reference = run_on_ranks(_step, 1, one_rank(argv))[0]
    assert reference[0] == pytest.approx(loss, rel=1e-5) and reference[1] == pytest.approx(norm, rel=1e-4)
    for got_loss, got_norm, got_logged, got_biases, got_params in run_on_ranks(_step, world_size, argv, timeout=240):
        assert got_loss == pytest.approx(loss, rel=1e-5)
        assert got_norm == pytest.approx(norm, rel=1e-4)
        assert got_logged == pytest.approx(logged, rel=1e-5)
        for layer, bias in got_biases.items():   # the expert-bias update (each TP rank's loads summed over TP)
            torch.testing.assert_close(torch.tensor(bias), torch.tensor(biases[layer]))
        assert bool(got_biases) == has_bias
        if got_params[0]:   # (without a pipeline: the names are the one-stage model's)
            if check_split is not None:
                check_split(got_params[0])
            assert_same_parameters(got_params, reference[4])
