"""The MoE flags under Megatron-LM's names reach ModelConfig, and bad combinations are refused in one line."""
import pytest
import yaml

from megalite.training.arguments import build_parser, parse_args

BASE = ["--mock-data", "--disable-bias-linear"]


def test_moe_flags_have_megatron_names_and_reach_fields():
    flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    for name in ("num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
                 "moe_shared_expert_gate",
                 "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
                 "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                 "moe_router_enable_expert_bias", "moe_router_dtype", "moe_expert_capacity_factor",
                 "moe_token_drop_policy", "moe_pad_expert_input_to_capacity", "expert_model_parallel_size",
                 "moe_token_dispatcher_type", "moe_grouped_gemm"):
        assert flags[name] == "--" + name.replace("_", "-"), name
    model, parallel = parse_args(BASE + [
        "--num-experts", "8", "--moe-router-topk", "2", "--moe-layer-freq", "2", "--ffn-hidden-size", "96",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-aux-loss-coeff", "1e-2",
        "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-router-dtype", "fp32", "--moe-grouped-gemm",
        "--num-layers", "4"])[:2]
    assert (model.num_experts, model.moe_router_topk, model.moe_layer_freq) == (8, 2, 2)
    assert model.moe_ffn_hidden_size == 96            # defaults to --ffn-hidden-size
    assert model.moe_router_score_function == "sigmoid" and model.moe_router_enable_expert_bias
    assert (model.moe_aux_loss_coeff, model.moe_router_load_balancing_type) == (1e-2, "seq_aux_loss")
    assert [model.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    assert parallel.expert_model_parallel_size == 1


@pytest.mark.parametrize("argv, words", [
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk 5 exceeds --num-experts 4"),
    (["--moe-ffn-hidden-size", "32"], "--moe-ffn-hidden-size describes experts but --num-experts is not given"),
    (["--num-experts", "4", "--moe-router-enable-expert-bias"], "needs --moe-router-score-function sigmoid"),
    (["--num-experts", "4", "--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"],
     "--moe-router-pre-softmax applies to --moe-router-score-function softmax only"),
    (["--num-experts", "4", "--moe-router-score-function", "tanh"], "invalid choice: 'tanh'"),
    # Megatron-LM's DeepEP / HybridEP dispatcher (GPU kernels megalite has not): refused, the two it serves named
    (["--num-experts", "4", "--moe-token-dispatcher-type", "flex"],
     "--moe-token-dispatcher-type: invalid choice: 'flex' (choose from 'allgather', 'alltoall')"),
    (["--num-experts", "4", "--moe-pad-expert-input-to-capacity"], "needs --moe-expert-capacity-factor"),
    (["--num-experts", "4", "--moe-shared-expert-gate"], "add --moe-shared-expert-intermediate-size"),
    (["--moe-shared-expert-gate"], "--moe-shared-expert-gate describes experts but --num-experts is not given"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be above 0"),
    (["--num-experts", "0"], "--num-experts must be at least 1"),
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 needs experts"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], "--num-experts 3 is not divisible by"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size 2 with --num-experts needs --sequence-parallel"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "4"],
     "--expert-tensor-parallel-size 4 differs from --tensor-model-parallel-size 2; only 1 (each expert whole) or 2"),
    (["--num-experts", "4", "--expert-tensor-parallel-size", "2"],
     "--expert-tensor-parallel-size 2 differs from --tensor-model-parallel-size 1"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "2", "--moe-ffn-hidden-size", "7"],
     "--moe-ffn-hidden-size 7 is not divisible by --expert-tensor-parallel-size 2"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "4"],
     "--expert-model-parallel-size 4 x --expert-tensor-parallel-size 2 does not divide TP x CP x DP = 2 x 1 x 2"),
    (["--num-experts", "8", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8 does not divide TP x CP x DP = 2 x 1 x 2"),
    (["--num-experts", "8", "--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8 does not divide"),
    (["--num-experts", "4", "--calculate-per-token-loss", "--moe-aux-loss-coeff", "0.01"],
     "--calculate-per-token-loss with MoE auxiliary losses"),
])
def test_moe_refusals_name_the_value(argv, words):
    with pytest.raises((ValueError, SystemExit)) as refused:
        parse_args(BASE + argv, world_size=4)
    assert words in str(refused.value) and "\n" not in str(refused.value)      # one line


def test_checkpoints_under_expert_parallelism_are_accepted():
    """They save every EP rank's experts and reshard to any EP (tests/checkpoint/test_moe_ep_checkpoint.py)."""
    configs = parse_args(BASE + ["--num-experts", "4", "--expert-model-parallel-size", "2", "--save", "ckpt",
                                 "--load", "ckpt"], world_size=4)
    parallel, training = configs[1], next(c for c in configs if hasattr(c, "save"))
    assert (parallel.expert_model_parallel_size, training.save, training.load) == (2, "ckpt", "ckpt")


def test_checkpoints_at_tp_and_ep_need_one_to_divide_the_other():
    """TP2 x DP2 x EP2 and EP4 save (tests/checkpoint/test_moe_tp_checkpoint.py); TP2 x DP3 x EP3 is refused."""
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", "ckpt", "--load", "ckpt"]
    for experts, ep in (("4", "2"), ("4", "4")):
        parallel = parse_args(BASE + tp2 + ["--num-experts", experts, "--expert-model-parallel-size", ep],
                              world_size=4)[1]
        assert parallel.expert_model_parallel_size == int(ep)
    with pytest.raises(ValueError) as refused:
        parse_args(BASE + tp2 + ["--num-experts", "6", "--expert-model-parallel-size", "3"], world_size=6)
    assert "--expert-model-parallel-size 3 at --tensor-model-parallel-size 2" in str(refused.value)
    # under expert TP = TP every TP folder's model file holds EP rank 0's slice: any EP saves
    parallel = parse_args(BASE + tp2 + ["--num-experts", "6", "--expert-model-parallel-size", "3",
                                        "--expert-tensor-parallel-size", "2"], world_size=12)[1]
    assert (parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size) == (3, 2)


def test_experts_fold_over_tensor_parallel_ranks():
    """TP=2 with SP: EP may span the TP ranks (EP 4 at TP 2 x DP 2); expert TP 1 is the default and accepted."""
    for extra in ([], ["--expert-tensor-parallel-size", "1"]):
        parallel = parse_args(BASE + ["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                      "--expert-model-parallel-size", "4"] + extra, world_size=4)[1]
        assert (parallel.expert_model_parallel_size, parallel.data_parallel_size) == (4, 2)


def test_expert_tensor_parallelism_is_tp_and_takes_expert_biases():
    """--expert-tensor-parallel-size 2 at TP 2 (tests/training/test_moe_expert_tensor_parallel.py), with or
    without the experts' biases."""
    etp2 = ["--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"]
    for flags in (BASE, ["--mock-data"]):
        model, parallel = parse_args(flags + etp2, world_size=4)[:2]
        assert parallel.expert_tensor_parallel_size == 2 and model.add_bias_linear == (flags != BASE)


def test_experts_take_linear_biases():
    """Without --disable-bias-linear each expert has its own biases (megalite/model/moe/experts.py)."""
    assert parse_args(["--mock-data", "--num-experts", "4"])[0].add_bias_linear


@pytest.mark.parametrize("text, layers, pattern", [
    ("2", 4, [True, False, True, False]), ("[1,0,0,1]", 4, [True, False, False, True]),
    ("([1]*3+[0]*1)*3", 12, [True, True, True, False] * 3), ("([0]+[1]*2)", 3, [False, True, True]),
    ("2*[1,0]", 4, [True, False, True, False])])
def test_moe_layer_freq_reads_megatrons_integer_and_list_forms(text, layers, pattern):
    model = parse_args(BASE + ["--num-experts", "4", "--num-layers", str(layers), "--moe-layer-freq", text])[0]
    assert [model.is_moe_layer(i) for i in range(layers)] == pattern


@pytest.mark.parametrize("text, words", [
    ("[1,0,1]", "--moe-layer-freq gives 3 layers but --num-layers is 4"),
    ("[1,0,2,1]", "each layer's entry is 1 (experts) or 0 (dense)"),
    ("[__import__('os')]", "only digits, ',', '[', ']', '(', ')', '+' and '*' are read"),
    ("[1]*[4]", "'*' repeats a list an integer number of times"), ("[1,0]+2", "'+' adds two integers or joins"),
    ("([1],[0])", "only integers, lists, '+', '*' and parentheses are read"), ("[1]*10**9", "only integers, lists"),
    ("([1]*4)*999999", "longer than any model"), ("[1,0", "not a valid expression"), ("0", "at least 1")])
def test_moe_layer_freq_refuses_what_is_no_pattern_in_one_line(text, words):
    with pytest.raises(ValueError) as refused:
        parse_args(BASE + ["--num-experts", "4", "--num-layers", "4", "--moe-layer-freq", text])
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_moe_layer_list_round_trips_through_a_config_file(tmp_path):
    from megalite.training.arguments import resolved_config
    model = parse_args(BASE + ["--num-experts", "4", "--num-layers", "4", "--moe-layer-freq", "([0]+[1])*2"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(resolved_config(model)))        # the list written as a YAML list
    assert parse_args(["--config", str(path)])[0].moe_layer_freq == [0, 1, 0, 1]
