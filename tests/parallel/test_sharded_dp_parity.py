"""Parity: ZeRO-2 and ZeRO-3 (--data-parallel-sharding-strategy optim_grads / optim_grads_params) train like one rank.

Each case runs the real entry (``megalite.training.loop.setup`` + ``train_step`` + ``evaluate``) on mock data
for a few steps -- at DP2 and DP4 alone (with overlapped reduce-scatters and, under ZeRO-3, prefetched
gathers), and with TP + SP, PP (1F1B and interleaved), CP (GPT and LLaMA), full recompute, MoE with expert
parallelism, fp16 with dynamic loss scaling, bf16 and bf16 gradient reduction, and the 8-rank TP2 x PP2
(interleaved) x DP2 + SP headline -- and is compared with the same flags on one rank: the loss, grad norm and
loss scale of every step, the validation loss, and every parameter after the steps (gathered whole under
ZeRO-3 with ``param_gather.whole_parameters``).

Every step accumulates several micro-batches (global batch 8 at micro-batch 1: four per step at DP2, two at
DP4), each reduce-scattered into the shards on its own; clipping acts on every step (the reference's grad
norms are all above --clip-grad, checked below); buckets are small, so every chunk has several and every
gather unit and bucket boundary is exercised.  Dropout is off, mock samples depend only on (seed, index) and
weights only on (seed, name), so every difference is the parallel machinery.  Cases of one world size share
one forked call (the file costs ~45 s of CPU time).
"""
import os

import pytest

from tests.parallel.tp_harness import run_layout_matrix

STEPS = 4
CLIP = 0.5
MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "96",
         "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "11"]
TRAINING = ["--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", str(STEPS), "--lr", "3e-3",
            "--clip-grad", str(CLIP), "--weight-decay", "0.1", "--log-interval", "1000", "--eval-iters", "1",
            "--ddp-bucket-size", "1000"]
VARIANTS = {
    "gpt": [],
    "gpt-4-layers": ["--num-layers", "4"],     # later flags win: two chunks on each of two stages
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
              "--disable-bias-linear"],
    # Each micro-batch's loss is divided by the micro-batches of one rank (8 here, 4 at DP2) and the DP
    # average comes after, so DP2 backpropagates twice the one-rank values: the same fp16 backward runs at
    # half the loss scale (FP16_DP2 below), and the scales are compared per micro-batch.  The first step
    # overflows, the scale halves, the second and third update, the fourth overflows after the scale
    # doubled (checked below): the inf found in some rank's shards must stop every rank.
    "fp16": ["--fp16", "--initial-loss-scale", str(2 ** 21), "--hysteresis", "1", "--loss-scale-window", "2"],
    "bf16": ["--bf16"],
    "moe": ["--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24",
            "--moe-aux-loss-coeff", "0.01"],
}
ZERO = {"zero2": ["--data-parallel-sharding-strategy", "optim_grads"],
        "zero3": ["--data-parallel-sharding-strategy", "optim_grads_params"]}
BOTH = ("zero2", "zero3")
OVERLAP = ["--overlap-grad-reduce"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
EP2 = ["--expert-model-parallel-size", "2"]
FP16_DP2 = ["--initial-loss-scale", str(2 ** 20)]
# (name, variant, world size, layout flags, strategies)
LAYOUTS = [
    ("dp2", "gpt", 2, [], BOTH),
    ("dp2-fp16", "fp16", 2, FP16_DP2, BOTH),
    ("dp2-bf16", "bf16", 2, [], BOTH),
    ("dp2-bf16-reduce-in-bf16", "bf16", 2, ["--grad-reduce-in-bf16"], BOTH),
    ("dp2-recompute", "gpt", 2, RECOMPUTE, BOTH),    # ZeRO-3: the recomputed forward runs the hooks again
    ("dp2-recompute-span-2", "gpt", 2, RECOMPUTE + ["--recompute-num-layers", "2"], ("zero3",)),
    ("dp2-ep2-moe", "moe", 2, EP2, BOTH),             # every expert on one rank: expert-DP size 1
    ("dp4-overlap", "gpt", 4, OVERLAP, ("zero2",)),
    ("dp4-overlap-gather", "gpt", 4, OVERLAP + ["--overlap-param-gather"], ("zero3",)),
    ("dp4-ep2-moe", "moe", 4, EP2, BOTH),             # expert buckets sharded over an expert-DP group of 2
    ("tp2-sp-dp2", "gpt", 4, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], BOTH),
    ("pp2-1f1b-dp2", "gpt", 4, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "1f1b"], BOTH),
    ("pp2-interleaved-dp2", "gpt-4-layers", 4, ["--pipeline-model-parallel-size", "2",
                                                "--virtual-pipeline-model-parallel-size", "2"], BOTH),
    ("cp2-dp2", "gpt", 4, ["--context-parallel-size", "2"], BOTH),
    ("llama-cp2-dp2", "llama", 4, ["--context-parallel-size", "2"], BOTH),
    ("tp2-pp2-interleaved-dp2-sp-overlap", "gpt-4-layers", 8,
     ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
      "--virtual-pipeline-model-parallel-size", "2"] + OVERLAP + ["--overlap-param-gather"], ("zero3",)),
]
CASES = [(f"{name}-{zero}", variant, world, layout + ZERO[zero])
         for name, variant, world, layout, zeros in LAYOUTS for zero in zeros]


def _train(rank, world_size, runs):
    """{name: ([(loss, grad norm, fp16 loss scale / micro-batches) per step], {full-model name: full
    parameter} of this rank's chunks, validation loss, {what this rank holds at rest})}."""
    os.environ["WORLD_SIZE"] = str(world_size)   # as torchrun would set it: the flags are checked against it
    from megalite.parallel import state
    from megalite.parallel.data_parallel import DistributedDataParallel
    from megalite.training.loop import evaluate, setup, train_step

    results = {}
    for name, argv in runs:
        run = setup(argv)
        try:
            history = []
            for _ in range(STEPS):
                record = train_step(run)
                scaler = run.optimizer.loss_scaler
                per_micro_batch = None if scaler is None else scaler.scale / run.num_microbatches
                history.append((record["loss"], record["grad_norm"], per_micro_batch))
            eval_loss = evaluate(run)["eval_loss"]
            wrappers = [chunk for chunk in run.model if isinstance(chunk, DistributedDataParallel)]
            at_rest = {"chunks": len(run.model), "buckets": sum(len(w.buckets) for w in wrappers),
                       "params": sum(1 for chunk in run.model for _ in chunk.parameters()),
                       "empty params": sum(p.numel() == 0 for chunk in run.model for p in chunk.parameters()),
                       "whole grad buckets": sum(b.grad_data is not None for w in wrappers for b in w.buckets),
                       "gathers": sum(w.param_gather.num_gathers for w in wrappers if w.param_gather is not None)}
            params = whole_model_parameters(run)
        finally:
            state.destroy_grid()
        results[name] = (history, params, eval_loss, at_rest)
    return results


def whole_model_parameters(run):
    """Every parameter of the one-stage model by its full name, whole: gathered under ZeRO-3, over TP
    (tp_harness.gather_full) and, for expert stacks, over EP (:func:`_all_experts`)."""
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.parallel.param_gather import whole_parameters
    from tests.parallel.tp_harness import gather_full
    params = {}
    with whole_parameters(run.model):
        for chunk in run.model:
            for full_name, param in unwrap_model(chunk)._full_named_parameters():
                full = gather_full(full_name, param, param, run.model_cfg.vocab_size)
                params[full_name] = _all_experts(full, param, run.grid)
    return params


def _all_experts(tensor, param, grid):
    """An expert-parallel stack [E / EP, ...] concatenated over the EP group into all E experts."""
    import torch
    import torch.distributed as dist

    from megalite.parallel.param_info import param_info
    if grid.ep_size == 1 or not param_info(param).expert_parallel:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(grid.ep_size)]
    dist.all_gather(parts, tensor.contiguous(), group=grid.ep_group)
    return torch.cat(parts)


@pytest.fixture(scope="module")
def runs():
    return run_layout_matrix(_train, MODEL, VARIANTS, TRAINING, CASES)


# Tolerances, measured over the matrix (4 steps) and chosen with room.  What a real bug moves, measured by
# breaking the code on purpose: a micro-batch's reduce-scatter assigned into the shard instead of added
# (data_parallel.py) moves every case's losses by >= 8e-3 relative and grad norms by >= 0.5; ZeRO-3
# parameters left whole after backward, so the next forward reads pre-update values, moves the losses by
# >= 5.7e-4 and the grad norms by >= 2.3e-3; a gather whose values never reach the parameters fails setup.
# - float32: the sums of the gradients run in another order (a reduce-scatter per micro-batch, TP/CP/PP
#   partial sums): measured losses within 4e-8 relative, grad norms within 1.3e-7, eval losses within
#   1.4e-8, parameters within 6.7e-6 absolute (LLaMA + CP; Adam amplifies round-off of near-zero grads).
FP32 = dict(loss=1e-6, norm=1e-6, param_abs=5e-5, param_rel=0.0)
# - fp16 / bf16 against the one-rank fp16 / bf16 run: the half-precision forward and backward are the same
#   computation on every rank, only the fp32 reductions differ: measured losses, eval losses and parameters
#   equal bit for bit, grad norms within 6.8e-8.  Chosen: the float32 bounds, and each parameter within one
#   ulp of its half-precision value (a master weight one fp32 round-off away may round the other way).
HALF = {"fp16": dict(FP32, param_rel=2.0 ** -10), "bf16": dict(FP32, param_rel=2.0 ** -7)}
# - --grad-reduce-in-bf16: every micro-batch's gradient is rounded to bf16 on the wire, and the sum again:
#   measured losses within 2.0e-5 relative, grad norms 1.1e-3, eval losses 5.2e-5, parameters within
#   5.9e-3 (one bf16 ulp near 1, or a few Adam steps of lr 3e-3 on a grad whose sign flipped).  Chosen:
#   losses 1e-4, grad norms 3e-3, parameters 2e-2 -- the parameters only coarsely; the losses still catch
#   both bugs above.
BF16_WIRE = dict(loss=1e-4, norm=3e-3, param_abs=2e-2, param_rel=0.0)


def tolerance(name: str, variant: str) -> dict:
    if "reduce-in-bf16" in name:
        return BF16_WIRE
    return HALF.get(variant, FP32)


def assert_same_training(ranks, reference, tol):
    """Every rank's losses, grad norms and loss scales equal the reference's; its parameters cover and equal them."""
    ref_history, ref_params, ref_eval_loss, _ = reference
    seen = set()
    for rank, (history, params, eval_loss, _) in enumerate(ranks):
        assert [s for _, _, s in history] == [s for _, _, s in ref_history], rank         # same skipped steps
        assert [n is None for _, n, _ in history] == [n is None for _, n, _ in ref_history], rank
        assert [loss for loss, _, _ in history] == pytest.approx([loss for loss, _, _ in ref_history],
                                                                 rel=tol["loss"]), rank
        assert [n for _, n, _ in history if n is not None] == \
            pytest.approx([n for _, n, _ in ref_history if n is not None], rel=tol["norm"]), rank
        assert eval_loss == pytest.approx(ref_eval_loss, rel=tol["loss"]), rank
        for name, param in params.items():
            ref = ref_params[name]
            bound = tol["param_abs"] + tol["param_rel"] * ref.float().abs()
            assert ((param.float() - ref.float()).abs() <= bound).all(), (rank, name)
            seen.add(name)
    assert seen == set(ref_params), sorted(set(ref_params) ^ seen)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_sharded_data_parallel_trains_like_one_rank(runs, case):
    references, per_rank = runs
    name, variant, world, _ = case
    ranks = [rank_results[name] for rank_results in per_rank[world]]
    assert_same_training(ranks, references[variant], tolerance(name, variant))
    for *_, at_rest in ranks:
        # The strategy took effect: no whole gradient is kept between steps, ZeRO-3 keeps no whole
        # parameter either (ZeRO-2 keeps them all), and every chunk has several buckets.
        assert at_rest["whole grad buckets"] == 0, at_rest
        zero3 = name.endswith("zero3")
        assert at_rest["empty params"] == (at_rest["params"] if zero3 else 0), at_rest
        assert at_rest["buckets"] >= 3 * at_rest["chunks"], at_rest


def test_references_clip_and_skip(runs):
    """The cases above mean what they say: every reference step is clipped (its norm is above --clip-grad),
    and the fp16 reference skips steps on overflow and updates between them."""
    references, _ = runs
    for variant, (history, *_) in references.items():
        norms = [norm for _, norm, _ in history]
        assert all(norm > CLIP for norm in norms if norm is not None), (variant, norms)
    fp16_norms = [norm for _, norm, _ in references["fp16"][0]]
    assert fp16_norms[0] is None and fp16_norms[3] is None and None not in fp16_norms[1:3], fp16_norms


def test_recomputed_forward_keeps_its_gathered_parameters_for_backward(runs):
    """ZeRO-3 with full recompute: a step launches as many all-gathers as without recompute.  A span of one
    layer is recomputed after its layer was gathered for backward; in a span of two, the first layer is
    gathered by its recomputed forward and kept for its backward (one more all-gather if it were dropped)."""
    _, per_rank = runs
    for rank in per_rank[2]:
        plain = rank["dp2-zero3"][3]["gathers"]
        assert plain > 0
        assert rank["dp2-recompute-zero3"][3]["gathers"] == rank["dp2-recompute-span-2-zero3"][3]["gathers"] == plain
