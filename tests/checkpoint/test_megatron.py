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
    ({"qk_layernorm": True}, "--qk-layernorm"),
    ({"apply_layernorm_1p": True}, "--apply-layernorm-1p"),
    ({"rotary_percent": 0.5}, "--rotary-percent"),
    ({"num_experts": 8}, "--num-experts"),
    ({"kv_channels": 16}, "--kv-channels 16"),
    ({"add_bias_linear": False, "add_qkv_bias": True}, "--add-qkv-bias"),
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
    assert convert(["--from", "megatron", "--load", str(tmp_path / "none"), "--save", str(tmp_path / "b")]) == 2
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
