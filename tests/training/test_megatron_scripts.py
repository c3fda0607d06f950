"""Acceptance: the argument lists of Megatron-LM's current scripts (tests/training/megatron_scripts/*.txt,
each naming its source and commit) parse and train a few iterations on 1 and 2 ranks (Mixtral's also on 4, as on one),
shrunk: sizes made tiny, paths pointed at a temporary folder, the FP8 flags removed (refused:
tests/config/test_megatron_switches.py), every other flag name kept.  The Megatron-FSDP script trains under
ZeRO-3 on 2 ranks as on one.

Flags a Megatron runner adds outside the file (the modelopt configurations hold only the model) and the
few this CPU test must add are in EXTRA, each with its reason."""
import math
import os

import pytest

from megalite.config.megatron_switches import ACCEPTED, FP8_NEEDS_TE, REFUSED
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args
from tests.data.conftest import CORPUS, train_small_tokenizer, write_corpus

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_scripts")

# Tiny values for the sizes (and the paths), per flag, for every script.
TINY = {
    "--num-layers": "2", "--hidden-size": "32", "--ffn-hidden-size": "64", "--num-attention-heads": "4",
    "--seq-length": "16", "--max-position-embeddings": "16", "--micro-batch-size": "1", "--log-interval": "1",
    "--eval-iters": "1", "--vocab-size": "64", "--num-query-groups": "2", "--kv-channels": "8",
}

FSDP = "train_llama3_8b_fsdp_h100_fp8"
# Its losses on 2 ranks under ZeRO-3 against 1 rank.  Both run the same bf16 forward per sample and sum the fp32
# gradients in another order only; measured equal to the bit over 4 steps (losses 4.19 -> 3.93), but one bf16 ulp
# of a weight flipped by that order would move a loss by ~1e-4.  A shard updated with this rank's gradient alone
# (no reduce-scatter) moves the losses by more than 1e-2 by step 4.
TOLERANCE = 1e-4

# Per script: its own shrunk values (by flag), what a runner or this test adds, and the iterations it trains.
CASES = {
    "train_gpt3_175b_distributed": dict(
        # Thresholds in tokens: 32 and 64 tokens are samples 2 and 4 of 16 tokens.
        values={"--global-batch-size": "4", "--step-batch-size-schedule": "0:2 32:2 64:4", "--train-iters": "4",
                "--lr-decay-iters": "4", "--pipeline-model-parallel-size": "{pp}", "--tensor-model-parallel-size": "1"},
        # Megatron-LM refuses --vocab-file/--merge-file without a --tokenizer-type too (and, at the commit read,
        # --global-batch-size beside a step schedule: megalite accepts it when it equals the schedule's last size).
        extra=["--tokenizer-type", "GPT2BPETokenizer"], iterations=4),
    "train_llama3_8b_h100_fp8": dict(
        values={"--global-batch-size": "4", "--train-samples": "12", "--lr-decay-samples": "12",
                "--lr-warmup-samples": "4", "--profile-step-start": "2", "--profile-step-end": "3"},
        # --profile alone is Megatron's nsys capture; on a CPU the PyTorch profiler stands in.
        extra=["--use-pytorch-profiler"], iterations=3),
    # Experts as the script sets them (2, over EP 2) except on one rank, where EP is 1; megalite has no SentencePiece
    # Llama2Tokenizer, so the tokenizer is a Hugging Face one (the flag names are kept, the type's value changes).
    "train_mixtral_8x7b_distributed": dict(
        values={"--tokenizer-type": "HuggingFaceTokenizer", "--expert-model-parallel-size": "{ep}",
                "--train-iters": "3"}, extra=[], iterations=3),
    # At the script's rate (1.5e-4) a tiny model does not visibly learn in 4 steps: the rates are raised.
    FSDP: dict(
        values={"--global-batch-size": "4", "--train-samples": "16", "--lr-decay-samples": "16",
                "--lr-warmup-samples": "4", "--lr": "3e-3", "--min-lr": "3e-4", "--decoupled-lr": "1e-2",
                "--decoupled-min-lr": "1e-3"}, extra=[], iterations=4),
    "Llama-3.2-1B-Instruct": dict(values={}, extra=[], iterations=2, runner=True),
    "Qwen3-0.6B": dict(values={}, extra=[], iterations=2, runner=True),
    "Qwen2.5-0.5B-Instruct": dict(values={}, extra=[], iterations=2, runner=True),
}
# What Megatron's modelopt runner scripts add to a configuration's MODEL_ARGS, shrunk.
RUNNER = ["--mock-data", "--tokenizer-model", "{tokenizer_json}", "--train-iters", "2", "--global-batch-size", "2",
          "--lr", "1e-4", "--eval-iters", "1", "--save", "{save}"]


def read_arguments(name):
    """[(flag, value or None)] of a script's file: one flag and its value per line after the header."""
    with open(os.path.join(SCRIPTS, name + ".txt")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("# source: ") and "commit " in lines[0]
    pairs = []
    for line in lines[1:]:
        flag, _, value = line.partition(" ")
        pairs.append((flag, value or None))
    return pairs


def shrunk_argv(name, world_size, folder, files, keep_refused=False):
    case = CASES[name]
    values = {**TINY, **case["values"]}
    paths = {"DATA_PATH": files["data"], "VOCAB_FILE": files["vocab"], "MERGE_FILE": files["merges"],
             "CHECKPOINT_PATH": os.path.join(folder, "ckpt"), "TENSORBOARD_LOGS_PATH": os.path.join(folder, "tb"),
             "DATA_CACHE_PATH": os.path.join(folder, "cache"), "TOKENIZER_MODEL": files["tokenizer_json"]}
    argv = []
    for flag, value in read_arguments(name):
        if flag in REFUSED and not keep_refused:
            continue
        argv.append(flag)
        if value is not None:
            value = paths.get(value, values.get(flag, value))
            argv.append(value.format(pp=world_size, ep=min(world_size, 2)))
    runner = [v.format(tokenizer_json=files["tokenizer_json"], save=paths["CHECKPOINT_PATH"]) for v in RUNNER] \
        if case.get("runner") else []
    return argv + runner + case["extra"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A GPT-2 BPE vocabulary and merges, a Hugging Face tokenizer.json, and a corpus of their ids."""
    root = tmp_path_factory.mktemp("megatron_scripts")
    train_small_tokenizer(root)
    write_corpus(str(root / "data"), 80, seed=0, vocab=250)
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(root / "tokenizer.json"))
    return {"vocab": str(root / "out" / "vocab.json"), "merges": str(root / "out" / "merges.txt"),
            "data": str(root / "data"), "tokenizer_json": str(root / "tokenizer.json")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_flag_name_of_the_script_is_kept_but_fp8(name, tmp_path, files):
    argv = shrunk_argv(name, 1, str(tmp_path), files)
    for flag, _ in read_arguments(name):
        assert (flag in argv) != (flag in REFUSED), flag
    parse_args(argv, world_size=1)


def _train(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return pretrain(argv)


@pytest.mark.parametrize("name, world_size", [(name, size) for name in sorted(CASES) if name != FSDP
                                               for size in (1, 2)])   # Mixtral on 4 ranks: below
def test_the_shrunk_script_trains(name, world_size, tmp_path, files):
    argv = shrunk_argv(name, world_size, str(tmp_path), files)
    histories = run_on_ranks(_train, world_size, argv, timeout=240)
    history = histories[0]
    assert len(history) == CASES[name]["iterations"]
    assert all(math.isfinite(r["loss"]) for r in history)
    assert all([r["loss"] for r in other] == [r["loss"] for r in history] for other in histories)
    if name == "train_gpt3_175b_distributed":      # the step schedule: 2 until sample 4, then 4
        assert [r["global_batch_size"] for r in history] == [2, 2, 4, 4]
    if name == "train_mixtral_8x7b_distributed":   # the balancing loss is logged beside the lm loss
        assert all(math.isfinite(r["load_balancing_loss"]) and r["load_balancing_loss"] > 0 for r in history)


def test_the_shrunk_mixtral_script_trains_on_4_ranks_as_on_one(tmp_path, files):
    """Its layout at 4 ranks: DP 4 over EP 2 (ZeRO-1, overlapped reduce and gather, the alltoall dispatcher, 2
    experts top-2: dropless), against EP 1 on one rank: each step's lm loss, balancing loss and grad norm within
    float32 round-off (the gradients summed in another order: measured within 5e-8 relative; expert gradients
    averaged over the DP group instead of the expert-DP group moved the third loss by 1.5e-5)."""
    name = "train_mixtral_8x7b_distributed"
    one = run_on_ranks(_train, 1, shrunk_argv(name, 1, str(tmp_path / "one"), files), timeout=240)[0]
    four = run_on_ranks(_train, 4, shrunk_argv(name, 4, str(tmp_path / "four"), files), timeout=240)
    assert len(one) == CASES[name]["iterations"] and all(r["load_balancing_loss"] > 0 for r in one)
    for history in four:
        for key in ("loss", "load_balancing_loss", "grad_norm"):
            assert [r[key] for r in history] == pytest.approx([r[key] for r in one], rel=1e-6), key


# -- the Megatron-FSDP script -------------------------------------------------------------------------------------


def test_the_fsdp_script_as_written_is_refused_in_one_line_for_fp8(tmp_path, files):
    argv = shrunk_argv(FSDP, 2, str(tmp_path), files, keep_refused=True)
    assert "--fp8-format" in argv and "--fp8-param-gather" in argv
    with pytest.raises(ValueError) as error:
        parse_args(argv, world_size=2)
    assert str(error.value) == f"--fp8-format: {FP8_NEEDS_TE}"


def test_the_fsdp_script_without_fp8_gets_the_meaning_of_its_flags(tmp_path, files):
    argv = shrunk_argv(FSDP, 2, str(tmp_path), files)
    _, parallel, optimizer, _, training = parse_args(argv, world_size=2)
    assert optimizer.use_megatron_fsdp and optimizer.sharding_strategy() == "optim_grads_params"
    assert optimizer.use_distributed_optimizer and optimizer.overlap_grad_reduce and optimizer.overlap_param_gather
    assert optimizer.decoupled_lr_range() == (1e-2, 1e-3) and training.calculate_per_token_loss
    assert parallel.data_parallel_size == 2
    # Every flag of the script that sets no config field is one of the accepted switches, with its sentence.
    switches = {s.flag for s in ACCEPTED}
    for flag in ("--init-model-with-meta-device", "--ckpt-format", "--use-nccl-ub", "--fsdp-double-buffer",
                 "--fsdp-manual-registration", "--no-gradient-accumulation-fusion",
                 "--no-check-for-nan-in-loss-and-grad", "--logging-level"):
        assert flag in argv and flag in switches, flag


def _train_and_look_at_the_shards(rank, world_size, argv):
    from megalite.parallel.launch import shut_down_distributed
    from megalite.training.loop import setup, train
    run = setup(argv)
    try:
        history = train(run)
        chunk = run.model[0]
        return ([r["loss"] for r in history], chunk.sharding_strategy,
                sum(p.numel() for p in chunk.module.parameters()),
                sum(b.param_shard.numel() for b in chunk.buckets), sum(b.numel for b in chunk.buckets))
    finally:
        shut_down_distributed()


def test_the_shrunk_fsdp_script_trains_under_zero3_as_on_one_rank(tmp_path, files):
    one = run_on_ranks(_train_and_look_at_the_shards, 1, shrunk_argv(FSDP, 1, str(tmp_path / "one"), files),
                       timeout=240)[0]
    two = run_on_ranks(_train_and_look_at_the_shards, 2, shrunk_argv(FSDP, 2, str(tmp_path / "two"), files),
                       timeout=240)
    losses = one[0]
    assert len(losses) == CASES[FSDP]["iterations"] and losses[-1] < losses[0]     # it trains
    for history, strategy, resident, shard, whole in two:
        assert strategy == "optim_grads_params"
        # At rest each rank holds its half of every bucket and no whole parameter (ZeRO-3).
        assert resident == 0 and shard * 2 == whole
        assert history == pytest.approx(losses, rel=0, abs=TOLERANCE)


def test_the_mixtral_script_trains_with_each_expert_split_over_the_tp_ranks(tmp_path, files):
    """The shrunk Mixtral script at TP 2 (DP 2, EP 2 as written) with --expert-tensor-parallel-size 2 on 4 ranks,
    its other flags as written (ZeRO-1, overlapped gradient reduction and parameter gathers, clipping, SwiGLU,
    GQA): the losses and gradient norms equal expert TP 1's at the same layout within float32 round-off.  The
    initial weights are drawn 20 times wider than the script's (std 0.2), so that the experts' part of the loss is
    far above round-off."""
    argv = shrunk_argv("train_mixtral_8x7b_distributed", 4, str(tmp_path), files)
    argv[argv.index("--tensor-model-parallel-size") + 1] = "2"
    argv[argv.index("--init-method-std") + 1] = "0.2"
    whole = run_on_ranks(_train, 4, argv, timeout=240)[0]
    split = run_on_ranks(_train, 4, argv + ["--expert-tensor-parallel-size", "2"], timeout=240)
    assert all([r["loss"] for r in other] == [r["loss"] for r in split[0]] for other in split)
    assert len(split[0]) == CASES["train_mixtral_8x7b_distributed"]["iterations"]
    # the expert GEMMs' sums run in another order (ffn halves added after fc2): float32 round-off
    assert [r["loss"] for r in split[0]] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    for key in ("load_balancing_loss", "grad_norm"):
        assert [r[key] for r in split[0]] == pytest.approx([r[key] for r in whole], rel=1e-5), key
