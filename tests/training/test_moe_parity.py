"""Parity of an MoE model with one rank: at every expert-parallel layout below, each of
three training steps' lm loss, grad norm, logged balancing loss and z-loss, the validation loss, the pairs the
capacity dropped, and EVERY parameter after the steps (TP shards and EP ranks' experts gathered whole) equal
the same flags' run on one process -- with the alltoall AND the allgather dispatcher at each layout with EP.

Layouts: EP2, EP4 (DP4), EP2 with ZeRO-1 (expert-DP 1 and 2), EP2 with TP2 + SP (expert TP 1; over the TP
pair, and with DP2), EP2 with PP2 (DP2), EP2 with CP2 (over the CP pair, and with DP2), and the 8-rank
TP2 x PP2 x DP2 + SP with EP2.  Capacity-bounded routing (``--moe-expert-capacity-factor``, which drops pairs
here: checked) at the layouts where each rank routes whole micro-batches, as one rank does -- DP2 with experts
replicated, EP2 (also with the position policy and padding), EP4, EP2 with ZeRO-1 and with PP2 -- with the
number of dropped pairs per layer and step, summed over the ranks, equal to one rank's.  Under TP + SP or CP
each rank routes its own s/t (s/cp) tokens against a capacity of its share, as in Megatron-LM
(megalite/model/moe/capacity.py), so other pairs drop than on one rank: no parity is claimed there.

The model: tests/parallel/test_sharded_dp_parity.py's (2 layers, hidden 32, sequence 16), 4 experts top-2,
balancing loss and z-loss, dropout off, float32; cases of one world size share one forked call.
"""
import os

import pytest
import torch

from tests.parallel.test_sharded_dp_parity import MODEL, whole_model_parameters
from tests.parallel.tp_harness import run_layout_matrix

STEPS = 3
TRAINING = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "3e-3",
            "--log-interval", "1000", "--eval-iters", "1", "--clip-grad", "0"]
MOE = ["--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24",
       "--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.01"]
CAPACITY = ["--moe-expert-capacity-factor", "1.0"]
# the first chosen pairs kept, and the balancing loss counting the padded rows (capacity.py)
POSITION = CAPACITY + ["--moe-token-drop-policy", "position", "--moe-pad-expert-input-to-capacity"]
VARIANTS = {"dropless": MOE, "capacity": MOE + CAPACITY, "capacity-position-padded": MOE + POSITION}
EP2, EP4 = ["--expert-model-parallel-size", "2"], ["--expert-model-parallel-size", "4"]
ZERO1 = ["--use-distributed-optimizer"]
TP2, PP2, CP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"], \
    ["--pipeline-model-parallel-size", "2"], ["--context-parallel-size", "2"]
# float32 sums in another order (the gradients over DP / EP / TP / CP, the pipeline's partial sums): measured over
# every case, losses, grad norms, balancing losses, z-losses and validation losses within 1.2e-7 relative, the
# parameters within 4.4e-7 absolute (lr 3e-3).  A capacity taken over the whole world's tokens, or expert
# gradients averaged over the DP group instead of the expert-DP group, moved the losses by > 1e-5.
REL, PARAM_ABS = 1e-6, 5e-6
# (name, variant, world size, layout flags); each with EP runs with both dispatchers (at EP 1 none is used)
LAYOUTS = [
    ("ep2", "dropless", 2, EP2), ("ep2-zero1", "dropless", 2, EP2 + ZERO1), ("tp2-ep2", "dropless", 2, TP2 + EP2),
    ("cp2-ep2", "dropless", 2, CP2 + EP2),    # the EP group is the CP pair: each expert takes both halves' rows
    ("dp2-capacity", "capacity", 2, []), ("ep2-capacity", "capacity", 2, EP2),
    ("ep2-capacity-position-padded", "capacity-position-padded", 2, EP2),
    ("dp4-ep4", "dropless", 4, EP4), ("dp4-ep2-zero1", "dropless", 4, EP2 + ZERO1),
    ("pp2-dp2-ep2", "dropless", 4, PP2 + EP2), ("cp2-dp2-ep2", "dropless", 4, CP2 + EP2),
    ("tp2-dp2-ep2", "dropless", 4, TP2 + EP2), ("dp4-ep4-capacity", "capacity", 4, EP4),
    ("dp4-ep2-zero1-capacity", "capacity", 4, EP2 + ZERO1), ("pp2-dp2-ep2-capacity", "capacity", 4, PP2 + EP2),
    ("tp2-pp2-dp2-ep2", "dropless", 8, TP2 + PP2 + EP2),
]
CASES = [(f"{name}-{dispatcher}", variant, world, layout + ["--moe-token-dispatcher-type", dispatcher])
         for name, variant, world, layout in LAYOUTS
         for dispatcher in (("alltoall", "allgather") if "--expert-model-parallel-size" in layout else ("alltoall",))]


def _count_drops(run):
    """Hooks on this rank's routers adding each forward's dropped pairs into a [layers] tensor (recomputes off)."""
    from megalite.model.moe.router import TopKRouter
    dropped = torch.zeros(run.model_cfg.num_layers, dtype=torch.float64)

    def hook(router, inputs, out):
        if out[2] is not None and router.training:
            dropped[router.layer_number] += float((~out[2]).sum())
    for chunk in run.model:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(hook)
    return dropped


def _train(rank, world_size, runs):
    """{name: ([(loss, grad norm, balancing loss, z-loss, dropped pairs per layer summed over the ranks) per
    step], {full-model name: whole parameter} of this rank's chunks, validation loss)}."""
    os.environ["WORLD_SIZE"] = str(world_size)
    import torch.distributed as dist

    from megalite.parallel import state
    from megalite.training.loop import evaluate, setup, train_step

    results = {}
    for name, argv in runs:
        run = setup(argv)
        try:
            dropped, history = _count_drops(run), []
            for _ in range(STEPS):
                before = dropped.clone()
                record = train_step(run)
                step = dropped - before
                if dist.is_initialized():   # each rank drops among its own tokens; TP/CP ranks are not counted
                    dist.all_reduce(step)
                history.append((record["loss"], record["grad_norm"], record["load_balancing_loss"],
                                record["z_loss"], step.tolist()))
            eval_loss = evaluate(run)["eval_loss"]
            params = whole_model_parameters(run)
        finally:
            state.destroy_grid()
        results[name] = (history, params, eval_loss)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_layout_matrix(_train, MODEL, VARIANTS, TRAINING, CASES)


def test_capacity_drops_pairs_and_changes_the_model(runs):
    references, _ = runs
    capacity, dropless = references["capacity"][0], references["dropless"][0]
    assert all(sum(step[4]) > 0 for step in capacity + references["capacity-position-padded"][0])   # every step drops
    assert all(sum(step[4]) == 0 for step in dropless)
    assert capacity[0][0] != pytest.approx(dropless[0][0], rel=1e-5)   # measured 7e-5 apart
    assert all(step[2] > 0 and step[3] > 0 for step in dropless)  # both auxiliary losses are on


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_moe_layout_trains_like_one_rank(runs, case):
    references, per_rank = runs
    name, variant, world, _ = case
    ref_history, ref_params, ref_eval = references[variant]
    seen = set()
    for rank, rank_results in enumerate(per_rank[world]):
        history, params, eval_loss = rank_results[name]
        # lm loss, grad norm, balancing loss, z-loss: float32 sums in another order
        for column in range(4):
            assert [s[column] for s in history] == pytest.approx([s[column] for s in ref_history],
                                                                 rel=REL), (rank, column)
        if variant != "dropless":   # each layer's dropped pairs over the whole batch
            assert [s[4] for s in history] == [s[4] for s in ref_history], rank
        assert eval_loss == pytest.approx(ref_eval, rel=REL), rank
        for param_name, param in params.items():
            torch.testing.assert_close(param, ref_params[param_name], rtol=0, atol=PARAM_ABS,
                                       msg=lambda m: f"rank {rank} {param_name}: {m}")
            seen.add(param_name)
    assert seen == set(ref_params), sorted(set(ref_params) ^ seen)
