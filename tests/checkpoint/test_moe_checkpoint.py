"""An MoE checkpoint (experts replicated over data parallelism, EP 1) resumes under another layout and follows
the uninterrupted run: the router, the stacked expert weights, the shared expert and the expert biases are
ordinary whole tensors of the tensor index (losses and merged parameters within float32 round-off)."""
from megalite.checkpoint import merge
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_reshard import MODEL, _assert_same_curve, _assert_same_params, _train_runs

MOE = ["--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24",
       "--moe-shared-expert-intermediate-size", "16", "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-bias-update-rate", "1e-2"]
TARGETS = {"single": (1, []), "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
           "cp2": (2, ["--context-parallel-size", "2"])}


def test_moe_checkpoint_reshards_from_dp2_zero1(tmp_path):
    source = str(tmp_path / "from-dp2")
    straight = run_on_ranks(_train_runs, 2, [(MODEL + MOE + ["--use-distributed-optimizer", "--save", source,
                                                             "--save-interval", "2"], None)], timeout=240)[0][0]
    assert not isinstance(straight, str), straight
    reference, _ = merge.merge_checkpoint(source, iteration=4)
    assert any(name.endswith("expert_bias") and value.abs().sum() > 0 for name, value in reference.items())
    for target, (world, flags) in TARGETS.items():
        folder = str(tmp_path / f"to-{target}")
        curve = run_on_ranks(_train_runs, world, [(MODEL + MOE + flags + ["--load", source, "--save", folder],
                                                   (source, 2))], timeout=240)[0][0]
        assert not isinstance(curve, str), f"{target}: {curve}"
        _assert_same_curve(curve, straight[2:])
        _assert_same_params(folder, reference)


def test_a_layer_list_checkpoint_at_pp2_names_global_layers_and_resumes_on_one_rank(tmp_path):
    """--moe-layer-freq as a list: a pipeline stage builds the experts of its global layers (stage 1's first
    layer is layer 2, which the list marks 1), the checkpoint names them so, and one rank resumes it."""
    flags = MODEL + MOE + ["--moe-layer-freq", "[0,1,1,0]", "--train-iters", "2"]
    source = str(tmp_path / "from-pp2")
    straight = run_on_ranks(_train_runs, 2, [(flags + ["--pipeline-model-parallel-size", "2", "--save", source,
                                                       "--save-interval", "1"], None)], timeout=240)[0][0]
    assert not isinstance(straight, str), straight
    reference, _ = merge.merge_checkpoint(source, iteration=2)
    with_experts = sorted({name.split(".")[2] for name in reference if ".experts." in name})
    assert with_experts == ["1", "2"]
    folder = str(tmp_path / "to-single")
    curve = run_on_ranks(_train_runs, 1, [(flags + ["--load", source, "--save", folder], (source, 1))])[0][0]
    assert not isinstance(curve, str), curve
    _assert_same_curve(curve, straight[1:])
    _assert_same_params(folder, reference)
