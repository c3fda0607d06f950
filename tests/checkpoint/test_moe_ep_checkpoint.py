"""Checkpoints under expert parallelism: each EP rank's experts are saved (model_optim_rng.pt holds EP rank 0's,
experts_ep{r:03d}.pt the others', megalite/checkpoint/expert_files.py) and described in the tensor index as boxes
of the global [E, ...] stack, so a resume at the saved layout is bit for bit the uninterrupted run (without
ZeRO, ZeRO-1 with the expert buckets sharded over the expert-DP group, ZeRO-3), and a resume at another EP
(EP2 -> EP1, EP1 -> EP2, EP2 -> EP4, EP4 -> EP2), DP or PP follows it within float32 round-off: losses, and
parameters after two Adam steps (which carry the moments).

The model of test_reshard.py with 4 experts top-2 in every layer, a shared expert, both auxiliary losses and
the expert bias; the alltoall dispatcher.  Source runs train 4 iterations saving at 2 and 4; resumed runs
rewind to 2, train 2 and save."""
import os

import pytest
import torch

from megalite.checkpoint import merge, paths
from megalite.checkpoint.hf import export_checkpoint
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_moe_checkpoint import MOE
from tests.checkpoint.test_reshard import MODEL, _assert_same_curve, _assert_same_params, _train_runs

ARGV = MODEL + MOE + ["--moe-token-dispatcher-type", "alltoall"]


def run_builders(tmp_path):
    """``folder(name)``: a run's save folder under ``tmp_path``; ``resume(source, flags, target)``: a run loading
    ``source`` (the tests' (argv, (folder, iteration)) pair) and saving to ``target``; ``straight(flags, name)``:
    a run from scratch saving every 2 iterations."""
    def folder(name):
        return str(tmp_path / name)

    def resume(source, flags, target):
        return ARGV + flags + ["--load", folder(source), "--save", folder(target)], (folder(source), 2)

    def straight(flags, name):
        return ARGV + flags + ["--save", folder(name), "--save-interval", "2"], None
    return folder, resume, straight
ZERO1 = ["--use-distributed-optimizer"]
ZERO3 = ZERO1 + ["--data-parallel-sharding-strategy", "optim_grads_params"]


def ep(size):
    return ["--expert-model-parallel-size", str(size)]


def _experts(state):
    return {name: value for name, value in state.items() if ".experts.weight" in name}


def _assert_bit_exact(resumed_curve, straight_curve, resumed_dir, straight_dir):
    assert not isinstance(resumed_curve, str), resumed_curve
    assert resumed_curve == straight_curve[2:]
    resumed, _ = merge.merge_checkpoint(resumed_dir)
    straight, _ = merge.merge_checkpoint(straight_dir, iteration=4)
    assert set(resumed) == set(straight)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_ep_checkpoints_resume_bit_exact_and_reshard_to_any_ep(tmp_path):
    folder, resume, straight = run_builders(tmp_path)

    # 4 ranks (DP 4): EP2 x expert-DP2 with and without ZeRO-1, each resumed at its own layout; EP2 -> EP4
    # (saving iterations 3 and 4); EP2 -> PP2 x DP2 x EP2 (each stage's folder holds its own experts file).
    to_ep4, rewind = resume("ep2-zero1", ep(4) + ZERO1, "ep2-to-ep4")
    four = run_on_ranks(_train_runs, 4, [
        straight(ep(2) + ZERO1, "ep2-zero1"), resume("ep2-zero1", ep(2) + ZERO1, "ep2-zero1-resumed"),
        straight(ep(2), "ep2"), resume("ep2", ep(2), "ep2-resumed"), (to_ep4 + ["--save-interval", "1"], rewind),
        resume("ep2", ep(2) + ["--pipeline-model-parallel-size", "2"], "ep2-to-pp2-ep2"),
        straight(ep(2) + ZERO3, "ep2-zero3"), resume("ep2-zero3", ep(2) + ZERO3, "ep2-zero3-resumed")],
        timeout=240)[0]
    # 2 ranks: EP1 x DP2 with ZeRO-1 -> EP2 x DP2; EP4 (ZeRO-1, iteration 3) -> EP2 x DP2 for the last step.
    two = run_on_ranks(_train_runs, 2, [
        straight(ZERO1, "ep1-dp2"), resume("ep1-dp2", ep(2), "ep1-to-ep2"),
        (ARGV + ep(2) + ["--load", folder("ep2-to-ep4"), "--save", folder("ep4-to-ep2")], (folder("ep2-to-ep4"), 3))],
        timeout=240)[0]
    with open(os.path.join(folder("ep2-to-ep4"), paths.TRACKER_FILE), "w") as f:   # its newest again
        f.write("4")
    one = run_on_ranks(_train_runs, 1, [resume("ep2-zero1", [], "ep2-to-ep1"),
                                        resume("ep2-zero3", [], "ep2-zero3-to-ep1")], timeout=240)[0]

    for curve in (four[0], four[2], four[6], two[0]):
        assert not isinstance(curve, str), curve
        assert [i for i, _ in curve] == [1, 2, 3, 4]
    for root, stage in (("ep2", 0), ("ep2-to-pp2-ep2", 0), ("ep2-to-pp2-ep2", 1)):
        shard = paths.rank_dir(folder(root), 4, 0, stage)
        assert sorted(f for f in os.listdir(shard) if f.startswith(("model", "experts"))) == \
            ["experts_ep001.pt", "model_optim_rng.pt"], (root, stage)
    _assert_bit_exact(four[1], four[0], folder("ep2-zero1-resumed"), folder("ep2-zero1"))
    _assert_bit_exact(four[3], four[2], folder("ep2-resumed"), folder("ep2"))
    _assert_bit_exact(four[7], four[6], folder("ep2-zero3-resumed"), folder("ep2-zero3"))

    ep2, _ = merge.merge_checkpoint(folder("ep2-zero1"), iteration=4)
    experts = _experts(ep2)
    assert experts and all(value.shape[0] == 4 for value in experts.values())   # all 4 experts, from both files
    for source, curve, target in (("ep2-zero1", four[4], "ep2-to-ep4"), ("ep2-zero1", one[0], "ep2-to-ep1"),
                                  ("ep1-dp2", two[1], "ep1-to-ep2"), ("ep2", four[5], "ep2-to-pp2-ep2"),
                                  ("ep2-zero3", one[1], "ep2-zero3-to-ep1"), ("ep2-zero1", two[2], "ep4-to-ep2")):
        assert not isinstance(curve, str), f"{target}: {curve}"
        sources = {"ep2-zero1": four[0], "ep2": four[2], "ep2-zero3": four[6], "ep1-dp2": two[0]}
        _assert_same_curve(curve, sources[source][-len(curve):])          # from iteration 3, or 4 (EP4 -> EP2)
        reference, _ = merge.merge_checkpoint(folder(source), iteration=4)
        _assert_same_params(folder(target), reference)


def test_an_ep2_checkpoint_is_read_whole_by_generation_and_conversion(tmp_path):
    save = str(tmp_path / "ep2")
    argv = ARGV + ep(2) + ["--train-iters", "1", "--save", save]
    curve = run_on_ranks(_train_runs, 2, [(argv, None)], timeout=240)[0][0]
    assert not isinstance(curve, str), curve
    merged, _ = merge.merge_checkpoint(save)
    model, _ = merge.load_model(save)      # megalite-generate's one-rank model: every expert in one stack
    for name, value in model.state_dict().items():
        if ".experts.weight" in name:
            assert value.shape[0] == 4
            assert torch.equal(value, merged[name]), name
    assert not torch.equal(*merged["decoder.layers.0.mlp.experts.weight1"].chunk(2))
    # Conversion merges the checkpoint through its tensor index first; then export refuses this model (sigmoid
    # scores, expert bias, an ungated shared expert: no Hugging Face MoE family holds it).
    with pytest.raises(ValueError, match="does not convert to Hugging Face as Mixtral or Qwen-MoE"):
        export_checkpoint(save, str(tmp_path / "hf"), tokenizer=False)


def test_expert_biases_are_split_over_ep_saved_by_each_ep_rank_and_reshard(tmp_path):
    """With linear biases each expert has its own fc1 / fc2 bias, a box of the [E, ...] stack like its weights:
    an EP2 checkpoint holds all four experts' biases (two from each EP rank's file) and resumes at EP1."""
    argv = [flag for flag in ARGV if flag != "--disable-bias-linear"] + ["--train-iters", "2"]
    source, target = str(tmp_path / "ep2"), str(tmp_path / "ep2-to-ep1")
    straight = run_on_ranks(_train_runs, 2, [(argv + ep(2) + ["--save", source, "--save-interval", "1"], None)],
                            timeout=240)[0][0]
    assert not isinstance(straight, str), straight
    reference, _ = merge.merge_checkpoint(source, iteration=2)
    biases = {name: value for name, value in reference.items() if ".experts.bias" in name}
    assert sorted({name.rsplit(".", 1)[1] for name in biases}) == ["bias1", "bias2"]
    for name, value in biases.items():
        assert value.shape[0] == 4, name
        assert not torch.equal(*value.chunk(2)), name            # EP rank 1's experts are not EP rank 0's
    curve = run_on_ranks(_train_runs, 1, [(argv + ["--load", source, "--save", target], (source, 1))])[0][0]
    assert not isinstance(curve, str), curve
    _assert_same_curve(curve, straight[1:])
    _assert_same_params(target, reference)
