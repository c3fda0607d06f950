"""Resume exactness: 6 iterations straight == 3, save, load, 3 more (losses and parameters, bit for bit)."""
import os

import pytest
import torch

from megalite.checkpoint import paths
from megalite.checkpoint import save_load as checkpoint
from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.testing import run_on_ranks

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "64", "--make-vocab-size-divisible-by", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--log-interval", "1000",
        "--eval-interval", "3", "--eval-iters", "1",
        # Dropout on: the resumed run must restore the RNG to draw the same masks.
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _train_and_report(rank, world_size, argv):
    from megalite.parallel import state
    from megalite.parallel.param_gather import whole_parameters
    from megalite.training.loop import setup, train
    run = setup(argv)
    history = train(run)
    with whole_parameters(run.model):     # ZeRO-3 keeps only shards between steps
        params = {f"{i}.{k}": v.detach().clone() for i, c in enumerate(run.model)
                  for k, v in unwrap_model(c).state_dict().items()}
    state.destroy_grid()
    return [(r["iteration"], r["loss"], r["lr"], r["grad_norm"], r.get("eval_loss")) for r in history], params


# (ranks, extra flags): each layout resumes exactly; a new layout is one line.
LAYOUTS = {
    "single": (1, []),
    "dp2": (2, []),
    "dp2-zero1": (2, ["--use-distributed-optimizer"]),   # optimizer shards saved per DP rank
    "bf16": (1, ["--bf16"]),                              # fp32 master weights saved and restored
    "tp2-pp2-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),           # one file per (tp, pp) shard; TP dropout streams
    "cp2": (2, ["--context-parallel-size", "2"]),          # RNG files per CP rank: CP-distinct dropout
    # Experts replicated over DP 2, ZeRO-1; the expert biases (saved buffers) must come back too.
    # ZeRO-2 and ZeRO-3 (--data-parallel-sharding-strategy): the same files as ZeRO-1, but ZeRO-3 gathers
    # the parameters to save them and writes its shards back on load; bf16: the fp32 masters round-trip.
    "dp2-zero2": (2, ["--data-parallel-sharding-strategy", "optim_grads"]),
    "dp2-zero3": (2, ["--data-parallel-sharding-strategy", "optim_grads_params"]),
    "dp2-zero2-bf16": (2, ["--data-parallel-sharding-strategy", "optim_grads", "--bf16"]),
    "dp2-zero3-bf16": (2, ["--data-parallel-sharding-strategy", "optim_grads_params", "--bf16"]),
    "tp2-dp2-zero3": (4, ["--tensor-model-parallel-size", "2", "--data-parallel-sharding-strategy",
                          "optim_grads_params", "--overlap-param-gather"]),
    "pp2-dp2-zero3": (4, ["--pipeline-model-parallel-size", "2", "--data-parallel-sharding-strategy",
                          "optim_grads_params"]),      # the tied embedding's two copies, each sharded
    "moe-dp2-zero1": (2, ["--use-distributed-optimizer", "--disable-bias-linear", "--num-experts", "4",
                          "--moe-aux-loss-coeff", "1e-2", "--moe-router-score-function", "sigmoid",
                          "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, layout):
    world, flags = LAYOUTS[layout]
    argv = TINY + flags
    save = str(tmp_path / "ckpt")
    straight, straight_params = run_on_ranks(_train_and_report, world, argv, timeout=120)[0]
    first, _ = run_on_ranks(_train_and_report, world, argv + ["--save", save, "--exit-interval", "3"], timeout=120)[0]
    assert paths.read_latest_iteration(save) == 3
    assert os.path.isfile(os.path.join(save, "iter_0000003", "mp_rank_00_000", "model_optim_rng.pt"))
    if "--use-distributed-optimizer" in flags or "--data-parallel-sharding-strategy" in flags:
        def size(flag):
            return int(flags[flags.index(flag) + 1]) if flag in flags else 1
        dp = world // (size("--tensor-model-parallel-size") * size("--pipeline-model-parallel-size"))
        for dp_rank in range(dp):
            shard = f"optimizer_dp{dp_rank:03d}_cp000.pt"
            assert os.path.isfile(os.path.join(paths.rank_dir(save, 3, 0, 0), shard))
    second, resumed_params = run_on_ranks(_train_and_report, world, argv + ["--load", save], timeout=120)[0]

    assert [r[0] for r in first] == [1, 2, 3] and [r[0] for r in second] == [4, 5, 6]
    assert first + second == straight                       # exact: loss, lr and grad norm of every iteration
    assert straight_params.keys() == resumed_params.keys()
    assert all(value.numel() for value in straight_params.values())     # whole, not ZeRO-3's dropped params
    for name, value in straight_params.items():
        assert torch.equal(value, resumed_params[name]), name


def test_checkpoint_loads_with_weights_only(tmp_path):
    save = str(tmp_path / "ckpt")
    run_on_ranks(_train_and_report, 1, TINY + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", save],
                 timeout=120)
    folder = paths.rank_dir(save, 1, 0, 0)
    state = torch.load(os.path.join(folder, "model_optim_rng.pt"), weights_only=True)
    assert state["iteration"] == 1 and state["consumed_samples"] == 4
    assert state["settings"]["model"]["hidden_size"] == 32
    assert "optimizer" in state and "scheduler" in state and "model" in state
    rng = torch.load(os.path.join(folder, "rng_dp000_cp000.pt"), weights_only=True)
    assert set(rng) >= {"torch_cpu", "python", "numpy"}


def test_rng_state_round_trip():
    import random

    import numpy as np
    saved = checkpoint.get_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_load_refuses_a_different_layout_and_missing_dir(tmp_path):
    save = str(tmp_path / "ckpt")
    run_on_ranks(_train_and_report, 1, TINY + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", save],
                 timeout=120)
    with open(os.path.join(save, paths.TRACKER_FILE), "w") as f:
        f.write("oops")
    with pytest.raises(ValueError, match="should hold an iteration number"):
        paths.read_latest_iteration(save)
    assert paths.read_latest_iteration(str(tmp_path / "nothing")) is None


def _save_run(rank, world_size, argv):
    from megalite.training.loop import pretrain
    pretrain(argv)


def test_generate_merges_tp_pp_shards_into_the_single_rank_model(tmp_path):
    """A TP=2 x PP=2 checkpoint, merged (checkpoint/merge.py), equals the one-rank run's weights; sampling works."""
    from megalite import generate
    from megalite.checkpoint import merge
    argv = TINY + ["--train-iters", "2", "--lr-warmup-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
                   "--global-batch-size", "4"]
    run_on_ranks(_save_run, 1, argv + ["--save", str(tmp_path / "one")], timeout=120)
    run_on_ranks(_save_run, 4, argv + ["--save", str(tmp_path / "grid"), "--tensor-model-parallel-size", "2",
                                       "--pipeline-model-parallel-size", "2"], timeout=180)
    one, settings = merge.merge_checkpoint(str(tmp_path / "one"))
    grid, _ = merge.merge_checkpoint(str(tmp_path / "grid"))
    assert set(grid) >= set(one)
    for name, value in one.items():
        # float32 round-off: TP splits the matmul reductions differently.
        torch.testing.assert_close(grid[name], value, rtol=1e-4, atol=1e-5, msg=name)
    model, _ = merge.load_model(str(tmp_path / "grid"))
    from megalite.config.settings import ModelConfig
    config = ModelConfig.from_saved(settings["model"])
    ids = generate.sample(model, config, [1, 2, 3], max_new_tokens=5, vocab_size=64, seed=0)
    assert len(ids) == 8 and all(0 <= i < 64 for i in ids)
