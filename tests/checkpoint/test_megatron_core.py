"""Megatron crossing checked against megatron-core itself (code nobody here wrote): megalite's exports
load into megatron-core's GPTModel (local layer spec, CPU, gloo) and give megalite's logits;
checkpoints that megatron-core writes (dist_checkpointing.save of its sharded_state_dict, and its
state_dict in the legacy layout) load into megalite with megatron-core's logits and loss.

Needs megatron-core (tested with 0.16.1); skipped where it is not importable (docs/megatron.md says
how to build the scratch environment).  megatron-core 0.16.1 calls ``torch.cuda.current_device``
unconditionally in RoPE's forward and in the torch_dist save, and ``torch.cuda.synchronize`` in the save;
on a CPU-only torch each rank process that runs megatron-core replaces those two with their CPU
meaning (device "cpu", nothing to wait for) first, and its CUDA RNG tracker (which only seeds dropout,
0 in these tests) forks nothing: ``_cpu_only``.  No value computed or written changes.
"""
import argparse
import contextlib
import os

import pytest
import torch

from megalite.checkpoint.convert import main as convert
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.conftest import FAMILIES, VOCAB

pytest.importorskip("megatron.core")

# float32 round-off between two implementations of the same sums (fused vs unfused softmax and norms,
# another summation order): ~1e-6 on O(1) logits.
ATOL = 1e-5
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _cpu_only():
    """In this (rank) process: megatron-core's unconditional CUDA calls answered for a CPU-only torch."""
    if not torch.cuda.is_available():
        from megatron.core import tensor_parallel
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        # The CUDA RNG tracker cannot be seeded without CUDA; it only seeds dropout, which is 0 here.
        tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()


def _mcore_model(args):
    """megatron-core's GPTModel (local spec, float32, CPU) built from a Megatron-LM ``args`` namespace,
    as Megatron-LM's core_transformer_config_from_args reads it."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    _cpu_only()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False)
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights).eval()


def _mcore_logits(model, tokens):
    seq = tokens.shape[1]
    positions = torch.arange(seq).expand_as(tokens)
    masked = torch.ones(seq, seq).triu(1).bool()[None, None]       # Megatron's mask: True where not attended
    with torch.no_grad():
        return model(tokens, positions, masked)[..., :VOCAB].float()        # [b, s, vocab]


def _megalite_logits(rank, world_size, root):
    from megalite.checkpoint.merge import load_model
    model, _ = load_model(root)
    with torch.no_grad():
        return model(TOKENS).float().permute(1, 0, 2)[..., :VOCAB]


def _exported_into_mcore(rank, world_size, root, ckpt_format):
    """megatron-core's logits of megalite's export at ``root``, loaded as Megatron-LM loads each format."""
    from megatron.core import dist_checkpointing

    folder = os.path.join(root, "iter_" + open(os.path.join(root, "latest_checkpointed_iteration.txt")).read()
                          .strip().zfill(7))
    if ckpt_format == "torch":
        saved = torch.load(os.path.join(folder, "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
        assert saved["checkpoint_version"] == 3.0
        model = _mcore_model(saved["args"])
        model.load_state_dict(saved["model"], strict=True)
    else:
        args = dist_checkpointing.load_common_state_dict(folder)["args"]
        model = _mcore_model(args)
        # As Megatron-LM loads: the model's sharded state under "model", the common state beside it.
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, folder)
        model.load_state_dict(loaded["model"], strict=True)
    return _mcore_logits(model, TOKENS)


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_into_megatron_core_with_the_same_logits(tmp_path, megalite_checkpoint, family, ckpt_format):
    save, out = megalite_checkpoint(family), str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", save, "--save", out, "--ckpt-format", ckpt_format]) == 0
    theirs = run_on_ranks(_exported_into_mcore, 1, out, ckpt_format, timeout=180)[0]
    ours = run_on_ranks(_megalite_logits, 1, save, timeout=120)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


def _hand_args(family):
    """The args Megatron-LM's save_checkpoint would store for the test's models (written here from
    Megatron-LM's flag names, not by megalite's exporter)."""
    llama = family == "llama"
    return argparse.Namespace(
        num_layers=2, hidden_size=32, ffn_hidden_size=48 if llama else 128, num_attention_heads=4,
        num_query_groups=2 if llama else 1, group_query_attention=llama, kv_channels=8, seq_length=16,
        max_position_embeddings=16, padded_vocab_size=128, vocab_size=VOCAB, make_vocab_size_divisible_by=64,
        normalization="RMSNorm" if llama else "LayerNorm", norm_epsilon=1e-5, swiglu=llama, openai_gelu=False,
        position_embedding_type="rope" if llama else "learned_absolute", rotary_base=10000, rotary_percent=1.0,
        untie_embeddings_and_output_weights=llama, add_bias_linear=not llama, add_qkv_bias=not llama,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, hidden_dropout=0.0, attention_dropout=0.0)


def _mcore_saves(rank, world_size, root, family, ckpt_format):
    """A randomly initialized megatron-core model saved by megatron-core's own code; its logits."""
    from megatron.core import dist_checkpointing

    torch.manual_seed(5)
    args = _hand_args(family)
    model = _mcore_model(args)
    with torch.no_grad():                     # megatron-core zeroes biases and sets norms to one at init
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    folder = os.path.join(root, "iter_0000007")
    os.makedirs(folder)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 7}
    if ckpt_format == "torch":
        os.makedirs(os.path.join(folder, "mp_rank_00"))
        torch.save({**common, "model": model.state_dict()}, os.path.join(folder, "mp_rank_00", "model_optim_rng.pt"))
    else:
        dist_checkpointing.save({**common, "model": model.sharded_state_dict()}, folder)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")
    return _mcore_logits(model, TOKENS)


def _megalite_loss(rank, world_size, argv):
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    run.scheduler.max_lr = run.scheduler.min_lr = 0.0            # measure, do not move
    return train_step(run)["loss"]


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_core_checkpoint_imports_with_its_logits_and_loss(tmp_path, family, ckpt_format):
    theirs_root, ours = str(tmp_path / "mcore"), str(tmp_path / "imported")
    os.makedirs(theirs_root)
    theirs = run_on_ranks(_mcore_saves, 1, theirs_root, family, ckpt_format, timeout=180)[0]
    assert convert(["--from", "megatron", "--load", theirs_root, "--save", ours]) == 0
    torch.testing.assert_close(run_on_ranks(_megalite_logits, 1, ours, timeout=120)[0], theirs, rtol=0, atol=ATOL)
    # The loss of megalite's first mock batch at TP=2 x PP=2 (resharded from the one-rank import) against
    # the cross entropy of megatron-core's logits of the same batch.
    from megalite.data.gpt_dataset import MockGPTDataset
    batch = [MockGPTDataset(VOCAB, 16, 4, 1234)[i] for i in range(4)]
    tokens, labels, mask = (torch.stack([torch.from_numpy(b[key]) for b in batch]) for key in
                            ("tokens", "labels", "loss_mask"))
    logits = run_on_ranks(_logits_of_saved, 1, theirs_root, family, tokens, timeout=120)[0]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    expected = ((per_token * mask.reshape(-1)).sum() / mask.sum()).item()
    argv = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
            "--eval-iters", "0", "--load", ours, "--finetune", "--use-checkpoint-args",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    losses = run_on_ranks(_megalite_loss, 4, argv, timeout=180)
    assert losses[-1] == pytest.approx(expected, abs=ATOL)


def _logits_of_saved(rank, world_size, root, family, tokens):
    """megatron-core's logits of ``tokens`` from the model ``_mcore_saves`` wrote (the legacy file or
    the torch_dist folder, loaded by megatron-core)."""
    from megatron.core import dist_checkpointing
    folder = os.path.join(root, "iter_0000007")
    model = _mcore_model(_hand_args(family))
    if os.path.isdir(os.path.join(folder, "mp_rank_00")):
        model.load_state_dict(torch.load(os.path.join(folder, "mp_rank_00", "model_optim_rng.pt"),
                                         weights_only=False)["model"])
    else:
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, folder)["model"])
    return _mcore_logits(model, tokens)
