"""MoE checkpoints to and from Megatron-LM without megatron-core installed: megalite -> Megatron -> megalite is
exact at EP 1, 2 and 4, with PP and TP, in both expert layouts; the legacy files are named and hold, key for key
and shape for shape, what megatron-core 0.16.1 itself holds at EP1, EP2 and TP2 x EP2 (recorded in
data/megatron_core_moe_keys.json by data/record_megatron_core_moe.py); a Megatron-LM save that holds only the
(TP rank, EP rank) pairs of its ranks imports; what megalite or Megatron-LM cannot hold is refused in one line.
test_megatron_core_moe.py checks the same files against megatron-core itself where it is installed."""
import json
import os

import pytest
import torch

from megalite.checkpoint.convert import main as convert
from megalite.checkpoint.megatron_args import config_from_args
from megalite.checkpoint.megatron_names import from_megatron, to_megatron
from megalite.config.settings import ModelConfig
from megalite.parallel.testing import run_on_ranks

RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "data", "megatron_core_moe_keys.json")))


def _merged(rank, world_size, root):
    from megalite.checkpoint.merge import merge_checkpoint
    return merge_checkpoint(root)[0]


def _export(load, out, *flags):
    assert convert(["--to", "megatron", "--load", load, "--save", out, *flags]) == 0
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(out, "iter_" + f.read().strip().zfill(7))


def _assert_same(before, after):
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def _load(folder, name):
    return torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)


LAYOUTS = {
    "ep2": ([], ["mp_rank_00_000", "mp_rank_00_001"]),
    "ep4": (["--expert-model-parallel-size", "4"], [f"mp_rank_00_00{e}" for e in range(4)]),
    "tp2pp2ep2-grouped-te": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--megatron-spec", "te", "--moe-grouped-gemm"],
                             [f"mp_rank_0{t}_00{p}_00{e}" for t in range(2) for p in range(2) for e in range(2)]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_megalite_to_megatron_and_back_is_exact(tmp_path, megalite_moe_checkpoint, layout):
    flags, folders = LAYOUTS[layout]
    out, back = str(tmp_path / "megatron"), str(tmp_path / "back")
    folder = _export(megalite_moe_checkpoint, out, "--expert-model-parallel-size", "2", *flags)
    assert sorted(os.listdir(folder)) == folders
    assert convert(["--from", "megatron", "--load", out, "--save", back]) == 0
    before, after = (run_on_ranks(_merged, 1, root, timeout=120)[0] for root in (megalite_moe_checkpoint, back))
    assert any(name.endswith("expert_bias") and value.abs().sum() > 0 for name, value in before.items())
    _assert_same(before, after)


def _shapes(model):
    return {name: None if value is None else list(value.shape) for name, value in model.items()}


@pytest.mark.parametrize("layout", [name for name, layout in RECORDED["layouts"].items() if not layout["bias"]])
def test_moe_legacy_files_hold_what_megatron_core_holds(tmp_path, megalite_moe_checkpoint, layout):
    """Each file megatron-core's ranks would save (expert-data-parallel rank 0) holds exactly the recorded keys
    and shapes; the export writes every (TP, EP) pair, a superset of the ranks' pairs at TP > 1."""
    recorded = RECORDED["layouts"][layout]
    tp, ep = recorded["tp"], recorded["ep"]
    folder = _export(megalite_moe_checkpoint, str(tmp_path / "megatron"), "--tensor-model-parallel-size", str(tp),
                     "--expert-model-parallel-size", str(ep))
    assert set(recorded["files"]) <= set(os.listdir(folder))
    for name, shapes in recorded["files"].items():
        saved = _load(folder, name)
        assert _shapes(saved["model"]) == shapes, name
        args = saved["args"]
        for field, value in RECORDED["args"].items():
            if field not in ("tensor_model_parallel_size", "expert_model_parallel_size"):
                assert getattr(args, field) == value, field
        assert (args.tensor_model_parallel_size, args.expert_model_parallel_size) == (tp, ep)


def test_moe_files_with_biases_hold_what_megatron_core_holds(tmp_path):
    """The model with every linear's bias (the experts' own, megatron-core's router bias as zeros), written at
    EP2 from a fresh model's state (no training needed), holds the recorded keys and shapes."""
    from megalite.checkpoint.megatron_format import write_legacy
    from tests.checkpoint.test_megatron_core_moe import moe_hand_args
    config = config_from_args(moe_hand_args(bias=True))
    theirs = to_megatron(_random_state(config), config, padded_vocab=config.padded_vocab_size(1))
    folder = write_legacy(theirs, config, str(tmp_path), tp=1, pp=1, iteration=1, spec="local", ep=2)
    recorded = RECORDED["layouts"]["ep2-bias"]["files"]
    assert sorted(os.listdir(folder)) == sorted(recorded)
    for name, shapes in recorded.items():
        model = _load(folder, name)["model"]
        assert _shapes(model) == shapes, name
        assert torch.count_nonzero(model["decoder.layers.0.mlp.router.bias"]) == 0


def test_a_megatron_save_with_only_its_ranks_pairs_imports(tmp_path, megalite_moe_checkpoint):
    """At TP2 x EP2 with expert TP 1 Megatron-LM's ranks hold (TP 0, EP 0) and (TP 1, EP 1) only (the recorded
    layout): the files of the other pairs removed, the import is the same."""
    out, back = str(tmp_path / "megatron"), str(tmp_path / "back")
    folder = _export(megalite_moe_checkpoint, out, "--tensor-model-parallel-size", "2",
                     "--expert-model-parallel-size", "2")
    kept = set(RECORDED["layouts"]["tp2ep2"]["files"])
    assert kept == {"mp_rank_00_000", "mp_rank_01_001"}
    for name in set(os.listdir(folder)) - kept:
        os.remove(os.path.join(folder, name, "model_optim_rng.pt"))
    assert convert(["--from", "megatron", "--load", out, "--save", back]) == 0
    _assert_same(*(run_on_ranks(_merged, 1, root, timeout=120)[0] for root in (megalite_moe_checkpoint, back)))
    os.remove(os.path.join(folder, "mp_rank_01_001", "model_optim_rng.pt"))      # EP rank 1's experts gone
    assert convert(["--from", "megatron", "--load", out, "--save", str(tmp_path / "torn")]) == 2


def _config(**changes):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
                  vocab_size=100, swiglu=True, normalization="RMSNorm", add_bias_linear=False, ffn_hidden_size=40,
                  untie_embeddings_and_output_weights=True,
                  num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_layer_freq=[1, 0])
    return ModelConfig(**{**fields, **changes})


def _random_state(config):
    from megalite.model.gpt import GPTModel
    torch.manual_seed(0)
    return {name: torch.randn_like(value) for name, value in GPTModel(config).state_dict().items()}


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_expert_names_and_swiglu_halves(experts):
    """Expert e's fc1 is [gate; up] of megalite's interleaved columns of weight1[e], transposed; fc2 is
    weight2[e] transposed; an MoE layer's norm keeps its own name under the Transformer Engine spec while the
    dense layer's is fused into its fc1; the router's zero bias appears with --add-bias-linear."""
    config = _config(add_bias_linear=True, moe_shared_expert_intermediate_size=None)
    state = _random_state(config)
    theirs = to_megatron(state, config, "te", experts=experts)
    weight1, weight2 = state["decoder.layers.0.mlp.experts.weight1"], state["decoder.layers.0.mlp.experts.weight2"]
    for expert in range(4):
        prefix = ("decoder.layers.0.mlp.experts." + (f"local_experts.{expert}.linear_fc{{}}.{{}}" if experts ==
                                                      "sequential" else f"linear_fc{{}}.{{}}{expert}"))
        fc1 = theirs[prefix.format(1, "weight")]
        assert torch.equal(fc1[:24], weight1[expert][:, 0::2].t())           # gate
        assert torch.equal(fc1[24:], weight1[expert][:, 1::2].t())           # up
        assert torch.equal(theirs[prefix.format(2, "weight")], weight2[expert].t())
        bias1 = state["decoder.layers.0.mlp.experts.bias1"][expert]
        assert torch.equal(theirs[prefix.format(1, "bias")], torch.cat([bias1[0::2], bias1[1::2]]))
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in theirs
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in theirs
    assert torch.count_nonzero(theirs["decoder.layers.0.mlp.router.bias"]) == 0
    _assert_same(state, from_megatron(theirs, config))
    theirs["decoder.layers.0.mlp.router.bias"][1] = 0.5
    with pytest.raises(ValueError, match="router.bias is not zero"):
        from_megatron(theirs, config)


def test_shared_expert_names():
    config = _config(moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True)
    state = _random_state(config)
    theirs = to_megatron(state, config)
    assert torch.equal(theirs["decoder.layers.0.mlp.shared_experts.gate_weight"],
                       state["decoder.layers.0.mlp.shared_expert_gate"])
    fc1 = state["decoder.layers.0.mlp.shared_expert.linear_fc1.weight"]
    assert torch.equal(theirs["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"],
                       torch.cat([fc1[0::2], fc1[1::2]]))
    _assert_same(state, from_megatron(theirs, config))


def test_moe_args_cross_both_ways():
    """Every MoE field megalite has is written under Megatron-LM's name and read back; a dispatcher megalite
    lacks (flex) changes no math and imports as megalite's default; what megalite cannot hold is one line."""
    from megalite.checkpoint.megatron_args import megatron_args
    from tests.checkpoint.test_megatron_core_moe import moe_hand_args
    config = _config(moe_layer_freq=[1, 0], moe_router_dtype="fp32", moe_expert_capacity_factor=1.5,
                     moe_token_drop_policy="position", moe_z_loss_coeff=1e-3, moe_router_topk_scaling_factor=2.0)
    args = megatron_args(config, tp=1, pp=1, iteration=1, spec="local", ckpt_format="torch", dtype=torch.float32,
                         ep=2)
    assert (args.num_experts, args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (4, 2, 1)
    assert config_from_args(args) == config
    flex = moe_hand_args()
    flex.moe_token_dispatcher_type = "flex"
    assert config_from_args(flex).moe_token_dispatcher_type == "allgather"
    flex.moe_router_load_balancing_type = "sinkhorn"
    with pytest.raises(ValueError, match="--moe-router-load-balancing-type 'sinkhorn'"):
        config_from_args(flex)


def test_bad_moe_exports_are_one_line(tmp_path, megalite_moe_checkpoint, capsys):
    for flags, named in ((["--expert-model-parallel-size", "3"], "--expert-model-parallel-size 3 does not divide"),
                         (["--moe-grouped-gemm"], "--moe-grouped-gemm writes TEGroupedMLP's names"),
                         (["--ckpt-format", "torch_dist"], "experts in --ckpt-format torch_dist"),
                         (["--use-legacy-models"], "--use-legacy-models writes the model before megatron-core")):
        out = str(tmp_path / flags[0].strip("-"))
        assert convert(["--to", "megatron", "--load", megalite_moe_checkpoint, "--save", out, *flags]) == 2
        error = capsys.readouterr().err
        assert named in error and error.count("\n") == 1, error
