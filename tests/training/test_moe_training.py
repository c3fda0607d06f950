"""MoE in the training loop: the step's loss, gradient, logged auxiliary losses and expert-bias update equal a
hand computation on one process (each micro-batch's lm loss plus its routers' weighted losses, averaged over
the four micro-batches), at one rank, with experts replicated over DP=2 (plain and ZeRO-1), and with experts
split over EP=2 and EP=4 ranks (the alltoall and allgather dispatchers; expert gradients reduced over the
expert-data-parallel group), over two pipeline stages (the losses attached on a stage without the loss;
experts placed by a --moe-layer-freq list of global layers) and over two context-parallel ranks (the loads
summed over CP, for aux_loss and seq_aux_loss)."""
import math

import pytest
import torch

from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel
from megalite.model.moe import aux_loss
from megalite.model.moe.router import TopKRouter
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args

SEQ = 8
ARGV = ["--mock-data", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", str(SEQ), "--vocab-size", "64", "--make-vocab-size-divisible-by", "64",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--eval-iters", "0", "--clip-grad", "0", "--train-iters", "1", "--seed", "5", "--log-interval", "1000",
        "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "12",
        "--moe-aux-loss-coeff", "0.5", "--moe-z-loss-coeff", "0.1", "--init-method-std", "0.2"]
BIAS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", "0.01"]


def _batch(i):
    tokens = torch.randint(0, 64, (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens[i:i + 1, :-1].contiguous(), "labels": tokens[i:i + 1, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).unsqueeze(0), "loss_mask": torch.ones(1, SEQ)}


def one_process(argv):
    """``argv`` without the layout sizes (the one-process model holds every layer and expert) and without
    recompute (the reference runs each layer once)."""
    for name in ("--expert-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
                 "--recompute-granularity", "--recompute-method"):
        if name in argv:
            at = argv.index(name)
            argv = argv[:at] + argv[at + 2:]
    return argv


def by_hand(argv, with_aux=True):
    """Over the four sequences: (lm loss, grad norm of lm loss + weighted aux losses, [mean logged balancing loss,
    mean z-loss], the expert biases after one update)."""
    model = GPTModel(ModelConfig.from_saved(vars(parse_args(one_process(argv), world_size=1)[0])))
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    weighted = []
    for router in routers:   # the weighted loss each router returns, captured to add by hand
        router.register_forward_hook(lambda module, inputs, out: weighted.append(out[3]))
    aux_loss.take_records()
    aux_loss.set_backward_scale(0.0)   # the attached path gives nothing: the sum below is the whole gradient
    total = 0
    for i in range(4):
        batch = _batch(i)
        total = total + model(batch["tokens"], batch["position_ids"], batch["labels"]).mean() / 4
    aux = sum(weighted) / 4
    ((total + aux) if with_aux else total).backward()
    aux_loss.set_backward_scale(1.0)
    records = aux_loss.take_records()
    logged = [sum(float(v) for v in records[name].values()) / (4 * len(routers)) for name in ("load_balancing_loss",
                                                                                              "z_loss")]
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    loads = [r.tokens_per_expert for r in routers] if routers[0].expert_bias is not None else []
    biases = [(0.01 * torch.sign(load.mean() - load)).tolist() for load in loads]
    return float(total.detach()), norm, logged, biases


def _step(rank, world_size, argv):
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    from megalite.parallel.context_parallel import split_for_context_parallel
    per_rank, dp_rank, cp = 4 // run.grid.dp_size, run.grid.dp_rank, run.grid.cp_size
    run.train_iter = iter([split_for_context_parallel(_batch(i), cp, run.grid.cp_rank)
                           for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)])
    record = train_step(run)
    biases = {m.layer_number: m.expert_bias.tolist() for chunk in run.model for m in chunk.modules()
              if isinstance(m, TopKRouter) and m.expert_bias is not None}      # this stage's layers
    return record["loss"], record["grad_norm"], [record["load_balancing_loss"], record["z_loss"]], biases


EP = ["--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size"]
PP = ["--pipeline-model-parallel-size", "2"]
CP = ["--context-parallel-size", "2"]
CAPACITY = ["--moe-expert-capacity-factor", "0.5", "--moe-token-drop-policy", "position"]   # drops pairs


@pytest.mark.parametrize("world_size, layout", [
    (1, []), (2, []), (2, ["--use-distributed-optimizer"]), (2, BIAS), (2, EP + ["2"]), (4, EP + ["2"]),
    (4, EP + ["4"] + BIAS), (2, ["--expert-model-parallel-size", "2"]), (4, ["--expert-model-parallel-size", "2"]),
    (2, PP + BIAS), (4, PP + EP + ["2"]), (4, EP + ["2", "--overlap-grad-reduce", "--ddp-bucket-size", "500"]),
    (2, CP + BIAS), (4, CP + EP + ["2"]), (2, EP + ["2", "--use-distributed-optimizer"]),
    (4, EP + ["2", "--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "500"]),
    (2, BIAS + ["--recompute-granularity", "full", "--recompute-method", "uniform"]), (1, CAPACITY),
    (2, EP + ["2"] + CAPACITY), (2, ["--expert-model-parallel-size", "2"] + CAPACITY),
    (2, CP + ["--moe-router-load-balancing-type", "seq_aux_loss"]), (2, PP + ["--moe-layer-freq", "[0,1]"])],
    ids=["one rank", "DP=2", "DP=2 ZeRO-1", "DP=2 bias", "EP=2", "DP=4 EP=2", "DP=4 EP=4 bias", "EP=2 allgather",
         "DP=4 EP=2 allgather", "PP=2 bias", "PP=2 DP=2 EP=2", "DP=4 EP=2 overlapped buckets", "CP=2 bias",
         "CP=2 DP=2 EP=2", "EP=2 ZeRO-1", "DP=4 EP=2 ZeRO-1 overlapped",
         "DP=2 bias full recompute", "capacity", "EP=2 capacity", "EP=2 allgather capacity",
         "CP=2 seq_aux_loss", "PP=2 layer list"])
def test_moe_step_matches_the_hand_computation(world_size, layout):
    argv = ARGV + layout
    loss, norm, logged, biases = by_hand(argv)
    lm_only = by_hand(argv, with_aux=False)
    assert abs(lm_only[1] - norm) > 1e-2 * norm        # the auxiliary losses move the gradient visibly
    for got_loss, got_norm, got_logged, got_biases in run_on_ranks(_step, world_size, argv, timeout=180):
        # the record's loss is the lm loss alone (as Megatron logs it); the aux losses are logged beside it
        assert got_loss == pytest.approx(loss, rel=1e-5)
        assert got_norm == pytest.approx(norm, rel=1e-4)
        assert got_logged == pytest.approx(logged, rel=1e-5)
        for layer, bias in got_biases.items():
            torch.testing.assert_close(torch.tensor(bias), torch.tensor(biases[layer]))
        assert (not got_biases) == ("--moe-router-enable-expert-bias" not in layout)


def _curve(rank, world_size, argv):
    """Three steps on a fixed stream of 12 sequences; the losses, grad norms and logged balancing losses."""
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    tokens = torch.randint(0, 64, (12, SEQ + 1), generator=torch.Generator().manual_seed(1))
    per_rank, curve = 4 // run.grid.dp_size, []
    for step in range(3):
        first = 4 * step + run.grid.dp_rank * per_rank
        run.train_iter = iter([{"tokens": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:],
                                "position_ids": torch.arange(SEQ).unsqueeze(0), "loss_mask": torch.ones(1, SEQ)}
                               for i in range(first, first + per_rank)])
        record = train_step(run)
        curve.append((record["loss"], record["grad_norm"], record["load_balancing_loss"]))
    return curve


def test_moe_training_curve_is_the_same_at_dp2_ep2_and_ep2_zero1():
    argv = ARGV + ["--lr", "1e-2", "--train-iters", "3", "--moe-token-dispatcher-type", "alltoall"]
    reference = run_on_ranks(_curve, 1, argv)[0]
    assert len({values[1] for values in reference}) == 3          # three different steps
    ep2 = ["--expert-model-parallel-size", "2"]
    for world_size, layout in ((2, []), (2, ep2), (4, ep2 + ["--use-distributed-optimizer"])):
        for curve in run_on_ranks(_curve, world_size, argv + layout, timeout=180):
            torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=1e-4, atol=0)


def test_expert_biases_train_the_same_at_ep2_with_either_dispatcher():
    """Each expert's fc1 / fc2 biases (--disable-bias-linear dropped): zero at first, they move after the
    first step, so the later steps check their forward at EP=2 too (alltoall; allgather with ZeRO-1)."""
    argv = [flag for flag in ARGV if flag != "--disable-bias-linear"] + ["--lr", "1e-2", "--train-iters", "3"]
    reference = run_on_ranks(_curve, 1, argv)[0]
    without = run_on_ranks(_curve, 1, ARGV + ["--lr", "1e-2", "--train-iters", "3"])[0]
    assert reference[2][0] != without[2][0]                  # the biases change the model
    ep2 = ["--expert-model-parallel-size", "2"]
    for layout in (ep2 + ["--moe-token-dispatcher-type", "alltoall"], ep2 + ["--use-distributed-optimizer"]):
        for curve in run_on_ranks(_curve, 2, argv + layout, timeout=180):
            torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=1e-4, atol=0)
