"""Megatron-LM checkpoints in and out without megatron-core installed: megalite -> Megatron -> megalite
is exact in both formats and at any TP x PP; the files hold, key for key and shape for shape, what
megatron-core 0.16.1 itself holds (recorded in data/megatron_core_keys.json by
data/record_megatron_core.py); SwiGLU's fc1 is split as megatron-core splits it; models and files
megalite cannot hold are refused by name.  test_megatron_core.py checks the same files against
megatron-core itself where it is installed."""
import argparse
import json
import os

import pytest
import torch

from megalite.checkpoint.convert import main as convert
from megalite.checkpoint.megatron_args import config_from_args
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.conftest import FAMILIES

RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "data", "megatron_core_keys.json")))


def _merged(rank, world_size, root):
    from megalite.checkpoint.merge import merge_checkpoint
    return merge_checkpoint(root)[0]


def _export(load, out, ckpt_format="torch", tp=1, pp=1, spec="local"):
    assert convert(["--to", "megatron", "--load", load, "--save", out, "--ckpt-format", ckpt_format,
                    "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                    "--megatron-spec", spec]) == 0


def _rank_files(root):
    """{(tp rank, pp rank): the legacy file's dict} of the newest iteration under ``root``."""
    folder = os.path.join(root, "iter_" + open(os.path.join(root, "latest_checkpointed_iteration.txt")).read()
                          .strip().zfill(7))
    files = {}
    for name in sorted(os.listdir(folder)):
        parts = name.split("_")[2:]
        files[(int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)] = torch.load(
            os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
    return folder, files


@pytest.mark.parametrize("ckpt_format,tp,pp,spec", [("torch", 1, 1, "local"), ("torch", 2, 2, "local"),
                                                    ("torch", 2, 1, "te"), ("torch_dist", 2, 1, "local")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megalite_to_megatron_and_back_is_exact(tmp_path, megalite_checkpoint, family, ckpt_format, tp, pp, spec):
    save, out, back = megalite_checkpoint(family), str(tmp_path / "megatron"), str(tmp_path / "back")
    _export(save, out, ckpt_format, tp, pp, spec)
    assert convert(["--from", "megatron", "--load", out, "--save", back]) == 0
    before, after = (run_on_ranks(_merged, 1, root, timeout=120)[0] for root in (save, back))
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_legacy_files_hold_what_megatron_core_holds(tmp_path, megalite_checkpoint, family, tp, pp):
    out = str(tmp_path / "megatron")
    _export(megalite_checkpoint(family), out, "torch", tp, pp)
    folder, files = _rank_files(out)
    expected = RECORDED["families"][family]["legacy"][f"tp{tp}pp{pp}"]
    names = sorted(os.listdir(folder))
    assert names == sorted(f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for t in range(tp) for p in range(pp))
    for (t, p), saved in files.items():
        assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 3
        shapes = {name: None if value is None else list(value.shape) for name, value in saved["model"].items()}
        assert shapes == expected[f"{t}_{p}"], (t, p)
        args = saved["args"]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
        recorded_args = RECORDED["families"][family]["args"]
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
                      "kv_channels", "normalization", "swiglu", "position_embedding_type",
                      "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias", "vocab_size"):
            assert getattr(args, field) == recorded_args[field], field


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_dist_keys_are_megatron_cores(tmp_path, megalite_checkpoint, family):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    out = str(tmp_path / "megatron")
    _export(megalite_checkpoint(family), out, "torch_dist")
    folder = os.path.join(out, "iter_0000003")
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    ours = {key: list(value.size) if isinstance(value, TensorStorageMetadata) else "bytes"
            for key, value in meta.items()}
    assert ours == RECORDED["families"][family]["torch_dist"]
    assert json.load(open(os.path.join(folder, "metadata.json")))["sharded_backend"] == "torch_dist"
    common = torch.load(os.path.join(folder, "common.pt"), weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 3 and common["args"].num_layers == 2


def test_swiglu_fc1_is_split_as_megatron_core_splits_it(tmp_path, megalite_checkpoint):
    """megalite interleaves gate and up rows; megatron-core's TP rank r holds [gate_r; up_r]."""
    save, out = megalite_checkpoint("llama"), str(tmp_path / "megatron")
    _export(save, out, "torch", 2, 2)
    fc1 = run_on_ranks(_merged, 1, save, timeout=120)[0]["decoder.layers.1.mlp.linear_fc1.weight"]
    gate, up = fc1[0::2], fc1[1::2]                                           # [48, 32] each
    _, files = _rank_files(out)
    for rank in range(2):
        shard = files[(rank, 1)]["model"]["decoder.layers.0.mlp.linear_fc1.weight"]   # global layer 1
        assert torch.equal(shard, torch.cat([gate[24 * rank:24 * (rank + 1)], up[24 * rank:24 * (rank + 1)]]))


def test_te_spec_fuses_the_layer_norms_into_the_linears(tmp_path, megalite_checkpoint):
    out = str(tmp_path / "megatron")
    _export(megalite_checkpoint("gpt2"), out, "torch", 1, 1, "te")
    model = _rank_files(out)[1][(0, 0)]["model"]
    assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.0.mlp.linear_fc1.layer_norm_bias"} <= set(model)
    assert not any("input_layernorm" in name or "pre_mlp_layernorm" in name for name in model)


def _args(**changes):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, padded_vocab_size=128)
    return argparse.Namespace(**{**base, **changes})


@pytest.mark.parametrize("changes,named", [
    ({"num_experts": 8, "expert_tensor_parallel_size": 2}, "--expert-tensor-parallel-size 2"),
    ({"num_experts": 8, "tensor_model_parallel_size": 2}, "--expert-tensor-parallel-size 2"),   # Megatron: ETP = TP
    ({"num_experts": 8, "moe_router_num_groups": 2}, "--moe-router-num-groups 2"),
    ({"num_experts": 8, "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"],
      "moe_aux_loss_coeff": [1e-2, 1e-3]}, "--moe-router-load-balancing-type aux_loss seq_aux_loss"),
    ({"num_experts": 8, "moe_grouped_gemm": True, "transformer_impl": "local"}, "legacy GroupedMLP"),
    ({"rotary_interleaved": True}, "--rotary-interleaved"),
    ({"add_bias_linear": True, "add_qkv_bias": False}, "--add-qkv-bias False with --add-bias-linear"),
    ({"position_embedding_type": "relative"}, "--position-embedding-type relative"),
])
def test_models_megalite_cannot_hold_are_refused_by_name(changes, named):
    config_from_args(_args())                                    # the base model converts
    with pytest.raises(ValueError, match=named):
        config_from_args(_args(**changes))


def test_bad_exports_and_imports_are_one_line(tmp_path, megalite_checkpoint, capsys):
    save = megalite_checkpoint("gpt2")
    assert convert(["--to", "megatron", "--load", save, "--save", str(tmp_path / "a"),
                    "--pipeline-model-parallel-size", "3"]) == 2
    assert "--pipeline-model-parallel-size 3 does not divide --num-layers 2" in capsys.readouterr().err
    _export(save, str(tmp_path / "c"))
    assert convert(["--to", "megatron", "--load", save, "--save", str(tmp_path / "c")]) == 2
    assert "iter_0000003 exists" in capsys.readouterr().err
    assert convert(["--to", "megatron", "--load", save, "--save", str(tmp_path / "d"), "--use-legacy-models",
                    "--ckpt-format", "torch_dist"]) == 2
    assert "--use-legacy-models is written in --ckpt-format torch only" in capsys.readouterr().err
    # A legacy checkpoint missing one rank's shard, and one of a virtual pipeline (model0, model1).
    torn = str(tmp_path / "torn")
    _export(save, torn, "torch", 2, 2)
    import shutil
    shutil.rmtree(os.path.join(torn, "iter_0000003", "mp_rank_01_001"))
    assert convert(["--from", "megatron", "--load", torn, "--save", str(tmp_path / "e")]) == 2
    assert "lacks the files of TP rank 1 of pipeline stage 1" in capsys.readouterr().err
    virtual = str(tmp_path / "virtual")
    _export(save, virtual)
    path = os.path.join(virtual, "iter_0000003", "mp_rank_00", "model_optim_rng.pt")
    saved = torch.load(path, weights_only=False)
    saved["model0"] = saved.pop("model")
    torch.save(saved, path)
    assert convert(["--from", "megatron", "--load", virtual, "--save", str(tmp_path / "f")]) == 2
    assert "virtual-pipeline checkpoint" in capsys.readouterr().err
    assert convert(["--from", "megatron", "--load", str(tmp_path / "none"), "--save", str(tmp_path / "b")]) == 2
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err


TRANSFORMERS_READS = json.load(open(os.path.join(os.path.dirname(__file__), "data",
                                                 "transformers_megatron_gpt2_reads.json")))


def test_legacy_models_gpt2_file_has_everything_transformers_converter_reads(tmp_path, megalite_checkpoint):
    """transformers 5.25 no longer ships convert_megatron_gpt2_checkpoint.py: its reads, dated, are the
    contract (data/transformers_megatron_gpt2_reads.json)."""
    import re
    out = str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", megalite_checkpoint("gpt2"), "--save", out,
                    "--use-legacy-models"]) == 0
    saved = _rank_files(out)[1][(0, 0)]
    assert set(TRANSFORMERS_READS["top_level"]) <= set(saved)
    assert saved["checkpoint_version"] >= TRANSFORMERS_READS["checkpoint_version_at_least"]
    args = saved["args"]
    for field in TRANSFORMERS_READS["args"]:
        assert hasattr(args, field), field
    sizes = {"h": args.hidden_size, "3h": 3 * args.hidden_size, "f": args.ffn_hidden_size,
             "V": args.padded_vocab_size, "P": args.max_position_embeddings}
    language_model = saved["model"]["language_model"]
    for path, shape in TRANSFORMERS_READS["model"].items():
        node = saved["model"]
        for part in path.split("."):
            node = node[part]
        assert list(node.shape) == [sizes[s] for s in shape], path
    encoder = language_model["encoder"]
    pattern = re.compile(TRANSFORMERS_READS["layer_names_must_match"])
    for template, shape in TRANSFORMERS_READS["encoder_or_transformer"].items():
        for i in range(args.num_layers) if "{i}" in template else [None]:
            name = template.format(i=i)
            assert list(encoder[name].shape) == [sizes[s] for s in shape], name
            assert name.startswith("final") or pattern.match(name), name
    assert max(int(pattern.match(name).group(1)) for name in encoder if name.startswith("layers.")) == \
        args.num_layers - 1


@pytest.mark.parametrize("family,tp,pp", [("gpt2", 1, 1), ("gpt2", 2, 2), ("llama", 2, 2)])
def test_legacy_models_layout_converts_back_exactly(tmp_path, megalite_checkpoint, family, tp, pp):
    save, out, back = megalite_checkpoint(family), str(tmp_path / "megatron"), str(tmp_path / "back")
    assert convert(["--to", "megatron", "--load", save, "--save", out, "--use-legacy-models",
                    "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]) == 0
    assert "language_model" in _rank_files(out)[1][(0, 0)]["model"]
    assert convert(["--from", "megatron", "--load", out, "--save", back]) == 0
    before, after = (run_on_ranks(_merged, 1, root, timeout=120)[0] for root in (save, back))
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


CONVERTER_ENV = "MEGALITE_TRANSFORMERS_MEGATRON_GPT2_CONVERTER"


@pytest.mark.skipif(not os.environ.get(CONVERTER_ENV), reason=f"{CONVERTER_ENV} does not name transformers 4.x's "
                    "convert_megatron_gpt2_checkpoint.py (from a transformers 4.x wheel)")
def test_transformers_converter_reads_the_export_with_megalites_logits(tmp_path, megalite_checkpoint):
    """transformers 4.x's own conversion function, run on the --use-legacy-models export: its GPT-2 gives
    megalite's logits."""
    import importlib.util
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("megatron_gpt2_converter", os.environ[CONVERTER_ENV])
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    save, out = megalite_checkpoint("gpt2"), str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", save, "--save", out, "--use-legacy-models"]) == 0
    saved = _rank_files(out)[1][(0, 0)]
    config = transformers.GPT2Config(activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    state = converter.convert_megatron_checkpoint(None, saved, config)
    model = transformers.GPT2LMHeadModel(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and set(unexpected) <= {name for name in state if name.endswith((".attn.bias", ".masked_bias"))}
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(tokens).logits[..., :100]
    ours = run_on_ranks(_megalite_logits, 1, save, tokens, timeout=120)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def _megalite_logits(rank, world_size, root, tokens):
    from megalite.checkpoint.merge import load_model
    model, _ = load_model(root)
    with torch.no_grad():
        return model(tokens).float().permute(1, 0, 2)[..., :100]


def test_the_front_door_sends_each_direction_to_its_converter(capsys):
    assert convert(["--help"]) == 0
    assert "--to megatron" in capsys.readouterr().out
    assert convert(["--load", "x", "--save", "y"]) == 2                 # no direction: the usage, one error
    with pytest.raises(SystemExit):
        convert(["--to", "hf", "--help"])
    assert "{hf}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        convert(["--to=megatron", "--help"])
    assert "--ckpt-format" in capsys.readouterr().out


def test_the_newer_model_fields_cross_in_the_args_both_ways():
    """QKV bias, q/k norms, a head size of its own, partial and scaled RoPE, 1p norms: written into
    Megatron's args and read back into the same ModelConfig."""
    from megalite.checkpoint.megatron_args import megatron_args
    from megalite.config.settings import ModelConfig
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=16,
                         add_bias_linear=False, add_qkv_bias=True, qk_layernorm=True, kv_channels=16,
                         position_embedding_type="rope", rotary_percent=0.5, use_rope_scaling=True,
                         rope_scaling_factor=4.0, apply_layernorm_1p=True, normalization="LayerNorm")
    args = megatron_args(config, tp=1, pp=1, iteration=1, spec="local", ckpt_format="torch", dtype=torch.float32)
    assert (args.add_qkv_bias, args.qk_layernorm, args.kv_channels, args.rotary_percent) == (True, True, 16, 0.5)
    assert config_from_args(args) == config


@pytest.mark.parametrize("ckpt_format,tp,pp", [("torch", 2, 2), ("torch_dist", 1, 1)])
def test_a_qwen_style_model_crosses_to_megatron_and_back_exactly(tmp_path, megalite_checkpoint, ckpt_format, tp, pp):
    save, out, back = megalite_checkpoint("qwen"), str(tmp_path / "megatron"), str(tmp_path / "back")
    _export(save, out, ckpt_format, tp, pp)
    assert convert(["--from", "megatron", "--load", out, "--save", back]) == 0
    before, after = (run_on_ranks(_merged, 1, root, timeout=120)[0] for root in (save, back))
    assert set(after) == set(before) and any("q_layernorm" in name for name in before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
