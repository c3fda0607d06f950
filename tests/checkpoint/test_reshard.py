"""Reshard matrix: a checkpoint saved under one layout resumes under another and follows the run
that was never interrupted (losses and parameters, within float32 round-off).

Each source layout trains 4 iterations, saving at 2 and 4: its curve and its iteration-4
parameters are the uninterrupted run.  Each target layout resumes from the source's iteration 2,
trains 2 more and saves, so its parameters can be merged (megalite/checkpoint/merge.py) and compared.  To
keep the cost low the runs of one world size share one set of forked ranks.  The model is
LLaMA-style with grouped-query attention and SwiGLU (the fused layouts) and a tied embedding (two
copies across pipeline stages); the vocabulary (64, divisible by 64) is padded to 64 rows at TP=1
and 128 at TP=2, so the padding rule is exercised.
"""
import os

import pytest
import torch

from megalite.checkpoint import merge, paths
from megalite.parallel.testing import run_on_ranks

MODEL = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--seq-length", "16", "--vocab-size", "64",
         "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
         "--log-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0",
         "--hidden-dropout", "0", "--attention-dropout", "0"]

SOURCES = {   # name: (ranks, flags)
    "tp2-pp2-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "tp2-dp2-zero1": (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]),
    "pp2-v2": (2, ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]),
}
TARGETS = {
    "single": (1, []),
    "dp2-zero1": (2, ["--use-distributed-optimizer"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "pp2-uneven": (2, ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
}


def _train_runs(rank, world_size, runs):
    """Each (argv, rewind) in turn on these ranks: [(iteration, loss), ...] per run, or the error of a run
    that failed.  ``rewind`` = (folder, iteration): point the folder's tracker there first."""
    import torch.distributed as dist

    from megalite.parallel import state
    from megalite.training.loop import setup, train
    results = []
    for argv, rewind in runs:
        if rewind is not None and rank == 0:
            with open(os.path.join(rewind[0], paths.TRACKER_FILE), "w") as f:
                f.write(str(rewind[1]))
        dist.barrier()
        try:
            run = setup(argv)
            results.append([(r["iteration"], r["loss"]) for r in train(run)])
        except ValueError as error:
            results.append(str(error))
        finally:
            if state.grid_is_initialized():
                state.destroy_grid()
    return results


def _assert_same_curve(losses, reference):
    # float32 round-off: TP, PP and DP sum the same terms in other orders.
    assert [i for i, _ in losses] == [i for i, _ in reference]
    torch.testing.assert_close(torch.tensor([loss for _, loss in losses]),
                               torch.tensor([loss for _, loss in reference]), rtol=1e-5, atol=0)


def _assert_same_params(folder, reference):
    merged, _ = merge.merge_checkpoint(folder)
    assert set(merged) >= set(reference)
    for name, value in reference.items():
        # float32 round-off of two Adam steps taken under another layout.  (Against another layout's
        # uninterrupted run the early steps differ more: Adam divides by sqrt(v), so where a gradient
        # is near zero, round-off moves the update by a fraction of lr; TP=2 vs TP=1 differ by 1.3e-4.)
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_reshard_matrix_continues_the_uninterrupted_run(tmp_path):
    def save_dir(source):
        return str(tmp_path / f"from-{source}")

    def resumed_dir(source, target):
        return str(tmp_path / f"{source}-to-{target}")

    straight = {name: (MODEL + flags + ["--save", save_dir(name), "--save-interval", "2"], None)
                for name, (_, flags) in SOURCES.items()}
    resumed = {(s, t): (MODEL + flags + ["--load", save_dir(s), "--save", resumed_dir(s, t)], (save_dir(s), 2))
               for s in SOURCES for t, (_, flags) in TARGETS.items()}
    by_world = {world: [key for key in resumed if TARGETS[key[1]][0] == world] for world in (1, 2, 4)}

    # The 4-rank sources, then the 2-rank source with the 2-rank targets, then the other loads.
    curves = dict(zip(["tp2-pp2-sp", "tp2-dp2-zero1"],
                      run_on_ranks(_train_runs, 4, [straight["tp2-pp2-sp"], straight["tp2-dp2-zero1"]],
                                   timeout=240)[0]))
    two = run_on_ranks(_train_runs, 2, [straight["pp2-v2"]] + [resumed[k] for k in by_world[2]], timeout=240)[0]
    curves["pp2-v2"] = two[0]
    losses = dict(zip(by_world[2], two[1:]))
    for world in (4, 1):
        losses.update(zip(by_world[world], run_on_ranks(_train_runs, world, [resumed[k] for k in by_world[world]],
                                                        timeout=240)[0]))

    for source, curve in curves.items():
        assert not isinstance(curve, str), f"{source}: {curve}"
        assert [i for i, _ in curve] == [1, 2, 3, 4]
        _assert_same_curve(curve, curves["pp2-v2"])        # every layout trains the same model
    for (source, target), curve in losses.items():
        assert not isinstance(curve, str), f"{source} -> {target}: {curve}"
        _assert_same_curve(curve, curves[source][2:])
        reference, _ = merge.merge_checkpoint(save_dir(source), iteration=4)
        _assert_same_params(resumed_dir(source, target), reference)


def test_an_iteration_without_its_tensor_index_is_refused_by_name(tmp_path):
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--train-iters", "2"]
    run_on_ranks(_train_runs, 1, [(argv + ["--save", save, "--exit-interval", "1"], None)], timeout=120)
    os.remove(os.path.join(paths.iteration_dir(save, 1), paths.TENSOR_INDEX))
    refused = run_on_ranks(_train_runs, 1, [(argv + ["--load", save], None)], timeout=120)[0][0]
    assert isinstance(refused, str), refused
    assert f"--load {save}: iteration 1 has no tensor_index.pt, which every megalite save writes" in refused


def test_an_untied_output_layer_reshards_its_vocabulary_rows(tmp_path):
    """TP=2 pads the output layer to 128 rows, TP=1 to 64: the saved padding rows are dropped."""
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--train-iters", "3", "--untie-embeddings-and-output-weights"]
    source = run_on_ranks(_train_runs, 2, [(argv + ["--tensor-model-parallel-size", "2", "--save", save,
                                                    "--save-interval", "1"], None)], timeout=120)[0][0]
    resumed = run_on_ranks(_train_runs, 1, [(argv + ["--load", save], (save, 1))], timeout=120)[0][0]
    assert not isinstance(resumed, str), resumed
    _assert_same_curve(resumed, source[1:])


@pytest.mark.parametrize("flags", [["--no-load-optim", "--no-load-rng"], ["--finetune"]])
def test_reshard_honours_the_load_flags(tmp_path, flags):
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--train-iters", "2"]
    run_on_ranks(_train_runs, 2, [(argv + ["--tensor-model-parallel-size", "2", "--save", save,
                                           "--exit-interval", "1"], None)], timeout=120)
    curve = run_on_ranks(_train_runs, 1, [(argv + ["--load", save] + flags, None)], timeout=120)[0][0]
    assert not isinstance(curve, str), curve
    # --finetune starts at iteration 0 from the loaded weights; the others continue at 2.
    assert [i for i, _ in curve] == ([1, 2] if "--finetune" in flags else [2])


def _optimizer_state_after(rank, world_size, argv, train_first):
    """{parameter name: [(start, end, master, exp_avg, exp_avg_sq), ...]} of this rank's pieces, after
    training (``train_first``) or right after setup (which loads ``--load``)."""
    from megalite.parallel import state
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.training.loop import setup, train
    run = setup(argv)
    if train_first:
        train(run)
    names = {id(p): n for chunk in run.model for n, p in unwrap_model(chunk).named_parameters()}
    pieces = {}
    for piece in run.optimizer.all_pieces():
        pieces.setdefault(names[id(piece.param)], []).append(
            (piece.start, piece.end, piece.master.clone(), piece.exp_avg.clone(), piece.exp_avg_sq.clone()))
    state.destroy_grid()
    return pieces


def test_zero1_bf16_masters_and_moments_move_exactly_to_one_rank(tmp_path):
    """DP=2 ZeRO-1 pieces (flat ranges of the bucket, cut across rows) of the fp32 masters and Adam
    moments, loaded at one rank without ZeRO-1: every element is the saved one, bit for bit."""
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--bf16", "--train-iters", "2"]
    saved = run_on_ranks(_optimizer_state_after, 2, argv + ["--use-distributed-optimizer", "--save", save], True,
                         timeout=120)
    loaded = run_on_ranks(_optimizer_state_after, 1, argv + ["--train-iters", "3", "--load", save], False,
                          timeout=120)[0]
    assert set(loaded) == set(saved[0]) | set(saved[1])
    for name, [(start, end, *whole)] in loaded.items():
        assert (start, end) == (0, whole[0].numel())
        pieces = sorted(p for rank in saved for p in rank.get(name, []) if p[1] > p[0])
        assert [p[0] for p in pieces][0] == 0 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        for k, what in enumerate(("master", "exp_avg", "exp_avg_sq")):
            assert torch.equal(whole[k], torch.cat([p[2 + k] for p in pieces])), f"{name} {what}"
    assert any(len([p for rank in saved for p in rank.get(name, [])]) == 2 for name in loaded)  # a split one


def _rng_after_setup(rank, world_size, argv):
    from megalite.parallel import state
    from megalite.parallel.random import get_rng_tracker
    from megalite.training.loop import setup
    setup(argv)
    drawn = (torch.get_rng_state(), get_rng_tracker().get_states())   # {stream: {device: state}}
    state.destroy_grid()
    return drawn


def test_rng_of_ranks_that_existed_is_restored_and_new_ranks_are_seeded_as_a_fresh_run(tmp_path):
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--train-iters", "1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # streams move
    run_on_ranks(_train_runs, 1, [(argv + ["--save", save], None)], timeout=120)
    saved = torch.load(os.path.join(paths.rank_dir(save, 1, 0, 0), "rng_dp000_cp000.pt"), weights_only=True)
    resumed = run_on_ranks(_rng_after_setup, 2, argv + ["--train-iters", "2", "--load", save], timeout=120)
    fresh = run_on_ranks(_rng_after_setup, 2, argv + ["--train-iters", "2"], timeout=120)
    def same_tracker(a, b):
        return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and
                                            all(torch.equal(a[k][d], b[k][d]) for d in a[k]) for k in a)
    assert torch.equal(resumed[0][0], saved["torch_cpu"])               # DP rank 0 existed: its saved stream
    assert same_tracker(resumed[0][1], saved["tracker"])
    assert not torch.equal(resumed[0][0], fresh[0][0])
    assert torch.equal(resumed[1][0], fresh[1][0])                      # DP rank 1 is new: a fresh run's seeding
    assert same_tracker(resumed[1][1], fresh[1][1])


def test_a_damaged_tensor_index_is_named(tmp_path):
    save = str(tmp_path / "ckpt")
    argv = MODEL + ["--train-iters", "2"]
    run_on_ranks(_train_runs, 1, [(argv + ["--save", save, "--exit-interval", "1"], None)], timeout=120)
    path = os.path.join(paths.iteration_dir(save, 1), paths.TENSOR_INDEX)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)
    refused = run_on_ranks(_train_runs, 2, [(argv + ["--tensor-model-parallel-size", "2", "--load", save], None)],
                           timeout=120)[0][0]
    assert isinstance(refused, str) and f"{path} is corrupt" in refused, refused
