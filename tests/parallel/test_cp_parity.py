"""Parity: context parallelism, alone and with TP + SP, PP, DP + ZeRO-1, trains like one rank.

Each case runs the real entry (``megalite.training.loop.setup`` + ``train_step``: the command line, mock
data through ``MicroBatches``, DDP, the optimizer with clipping) for a few steps and is compared with
the same flags on one rank: the loss and grad norm of every step, every parameter after the steps
and the validation loss (``evaluate``, which reads its batches through the same split).  Dropout is
off (masks cannot match another layout's); mock samples depend only on (seed, index) and weights
only on (seed, name), so every difference is the parallel machinery.  Cases of one world size share
one forked call.
"""
import os

import pytest

from tests.parallel.tp_harness import run_layout_matrix

STEPS = 4
MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "96",
         "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "11"]
VARIANTS = {
    "gpt": [],
    "gpt-4-layers": ["--num-layers", "4"],     # later flags win: two chunks on each of two stages
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
              "--disable-bias-linear"],
}
# Qwen-style attention: QKV bias, per-head q/k norms, a head size other than hidden/heads, Llama 3 RoPE scaling.
VARIANTS["qwen"] = VARIANTS["llama"] + ["--add-qkv-bias", "--qk-layernorm", "--kv-channels", "16", "--use-rope-scaling"]
VARIANTS["llama-8-heads"] = VARIANTS["llama"] + ["--num-attention-heads", "8", "--num-query-groups", "4"]
# Packed documents (Megatron's three flags): the mock samples then hold end-of-document tokens.
PACKED = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
VARIANTS["gpt-packed"] = PACKED
VARIANTS["llama-packed"] = VARIANTS["llama"] + PACKED
TRAINING = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "3e-3",
            "--clip-grad", "1.0", "--weight-decay", "0.1", "--log-interval", "1000", "--eval-iters", "1"]
# (name, variant, world size, layout flags)
CASES = [
    ("gpt-cp2", "gpt", 2, ["--context-parallel-size", "2"]),
    ("llama-cp2", "llama", 2, ["--context-parallel-size", "2"]),
    ("llama-cp2-selective", "llama", 2, ["--context-parallel-size", "2", "--recompute-granularity", "selective"]),
    ("gpt-cp2-full-recompute", "gpt", 2, ["--context-parallel-size", "2", "--recompute-granularity", "full",
                                          "--recompute-method", "uniform"]),
    ("gpt-cp4", "gpt", 4, ["--context-parallel-size", "4"]),
    ("llama-cp4", "llama", 4, ["--context-parallel-size", "4"]),
    ("llama-cp2-tp2-sp", "llama", 4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                      "--sequence-parallel"]),
    ("gpt-cp2-pp2-1f1b", "gpt", 4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                    "--pipeline-schedule", "1f1b"]),
    ("gpt-cp2-pp2-zb-h1", "gpt", 4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                     "--pipeline-schedule", "zb-h1"]),
    ("gpt-cp2-pp2-interleaved", "gpt-4-layers", 4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size",
                                                    "2", "--virtual-pipeline-model-parallel-size", "2"]),
    ("gpt-cp2-dp2-zero1", "gpt", 4, ["--context-parallel-size", "2", "--use-distributed-optimizer",
                                     "--overlap-grad-reduce", "--ddp-bucket-size", "2000"]),
    ("gpt-tp2-pp2-cp2", "gpt", 8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                   "--context-parallel-size", "2"]),
    ("llama-tp2-cp2-dp2-sp-zero1", "llama", 8, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                                                "--sequence-parallel", "--use-distributed-optimizer"]),
]
# The cases above use the default --cp-comm-type p2p (the ring); each other type at CP 2 and 4, with
# GPT and LLaMA, TP2 + SP, PP2 and ZeRO-1 (a2a needs CP to divide each TP rank's key/value groups).
for comm in ("all_gather", "a2a"):
    flags = ["--cp-comm-type", comm]
    cp2, cp4 = ["--context-parallel-size", "2"] + flags, ["--context-parallel-size", "4"] + flags
    CASES += [
        (f"gpt-cp2-{comm}", "gpt", 2, cp2),
        (f"llama-cp2-{comm}", "llama", 2, cp2),
        (f"gpt-cp4-{comm}", "gpt", 4, cp4),
        (f"llama-cp4-{comm}", "llama-8-heads" if comm == "a2a" else "llama", 4, cp4),
        (f"gpt-cp2-tp2-sp-{comm}", "gpt", 4, cp2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (f"gpt-cp2-pp2-{comm}", "gpt", 4, cp2 + ["--pipeline-model-parallel-size", "2"]),
        (f"gpt-cp2-dp2-zero1-{comm}", "gpt", 4, cp2 + ["--use-distributed-optimizer"]),
    ]
CASES += [("qwen-cp2", "qwen", 2, ["--context-parallel-size", "2"]),
          ("qwen-cp2-a2a", "qwen", 2, ["--context-parallel-size", "2", "--cp-comm-type", "a2a"])]
# Packed documents: one rank (the reference is one rank with the same flags) and CP2 of every type.
CASES += [("gpt-packed-cp2", "gpt-packed", 2, ["--context-parallel-size", "2"])]
CASES += [(f"llama-packed-cp2-{comm}", "llama-packed", 2, ["--context-parallel-size", "2", "--cp-comm-type", comm])
          for comm in ("p2p", "all_gather", "a2a")]


def _train(rank, world_size, runs):
    """{name: ([(loss, grad norm) per step], {full-model name: full parameter} of this rank's chunks,
    validation loss after the steps)}."""
    os.environ["WORLD_SIZE"] = str(world_size)   # as torchrun would set it: the flags are checked against it
    from megalite.parallel import state
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.training.loop import evaluate, setup, train_step
    from tests.parallel.tp_harness import gather_full

    results = {}
    for name, argv in runs:
        run = setup(argv)
        try:
            history = [train_step(run) for _ in range(STEPS)]
            eval_loss = evaluate(run)["eval_loss"]
            params = {}
            for chunk in run.model:
                for full_name, param in unwrap_model(chunk)._full_named_parameters():
                    params[full_name] = gather_full(full_name, param, param, run.model_cfg.vocab_size)
        finally:
            state.destroy_grid()
        results[name] = ([(r["loss"], r["grad_norm"]) for r in history], params, eval_loss)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_layout_matrix(_train, MODEL, VARIANTS, TRAINING, CASES)


def assert_same_training(ranks, reference):
    """Every rank's losses and grad norms equal the reference's, and its parameters cover and equal them."""
    ref_history, ref_params, ref_eval_loss = reference
    seen = set()
    for rank, (history, params, eval_loss) in enumerate(ranks):
        # Float32 round-off: CP reorders the sums of attention (two chunks' softmax over prefixes),
        # of the loss (partial sums over CP) and of the gradients (reduce-scatter of dK/dV, DDP over
        # DP x CP).  Measured over the matrix: losses within 8e-8 relative, grad norms within 1e-7,
        # parameters within 6e-6 absolute.  A lost token, a wrong mask or a wrong 1/CP moves the
        # loss and the norm by >= 1e-3 relative at once (dropping the CP factor of the loss fails them).
        assert [loss for loss, _ in history] == pytest.approx([loss for loss, _ in ref_history], rel=1e-6), rank
        assert [norm for _, norm in history] == pytest.approx([norm for _, norm in ref_history], rel=1e-6), rank
        assert eval_loss == pytest.approx(ref_eval_loss, rel=1e-6), rank
        for name, param in params.items():
            # Parameters are O(0.02..1); elements whose true gradient is 0 (the key bias) drift on
            # Adam-amplified round-off, ~2e-3 lr per step (test_tp_parity.py): 2.4e-5 after 4 steps.
            assert (param - ref_params[name]).abs().max().item() < 5e-5, (rank, name)
            seen.add(name)
    assert seen == set(ref_params), sorted(set(ref_params) ^ seen)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_context_parallel_layout_trains_like_one_rank(runs, case):
    references, per_rank = runs
    name, variant, world, _ = case
    assert_same_training([rank_results[name] for rank_results in per_rank[world]], references[variant])
