"""Megatron crossing checked against megatron-core itself (code nobody here wrote), at TP=1 x PP=1 and
TP=2 x PP=2 on megatron-core's side (CPU, gloo, the local layer spec): megalite's exports (a megalite
checkpoint trained at TP=2 x PP=2) load into megatron-core's GPTModel and give megalite's logits;
checkpoints that megatron-core writes (dist_checkpointing.save of its sharded_state_dict, and each
rank's state_dict in the legacy layout) load into megalite with megatron-core's logits, and with its
loss at TP=2 x PP=2 in megalite.

Needs megatron-core (tested with 0.16.1); skipped where it is not importable (docs/megatron.md says
how to build the scratch environment).  megatron-core 0.16.1 calls ``torch.cuda.current_device``
unconditionally in RoPE's forward and in the torch_dist save, ``torch.cuda.synchronize`` in the save, and
``Tensor.cuda()`` before the all-reduce of a tied embedding across pipeline stages; on a CPU-only torch
each rank process that runs megatron-core replaces those three with their CPU meaning (device "cpu",
nothing to wait for, the tensor itself) first, and its CUDA RNG tracker (which only seeds dropout,
0 in these tests) forks nothing: ``_cpu_only``.  No value computed or written changes.
"""
import argparse
import contextlib
import os

import pytest
import torch

from megalite.checkpoint.convert import main as convert
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.conftest import FAMILIES, FAMILIES_CROSSED_ONLY, VOCAB

try:
    import megatron.core  # noqa: F401
    HAVE_MEGATRON_CORE = True
except ImportError:
    HAVE_MEGATRON_CORE = False
# A mark rather than a module-level importorskip: tests/conftest.py imports each module of the folder at
# collection, where a skip raised by the import would end the collection of its neighbours too.
pytestmark = pytest.mark.skipif(not HAVE_MEGATRON_CORE, reason="megatron-core is not installed (docs/megatron.md)")

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
        torch.Tensor.cuda = lambda self, *args, **kwargs: self      # the tied embedding's all-reduce at PP > 1
        # The CUDA RNG tracker cannot be seeded without CUDA; it only seeds dropout, which is 0 here.
        tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()


def _mcore_model(args, tp=1, pp=1):
    """This rank's pipeline stage of megatron-core's GPTModel (local spec, float32, CPU) at ``tp`` x ``pp``,
    built from a Megatron-LM ``args`` namespace as Megatron-LM's core_transformer_config_from_args reads it."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    _cpu_only()
    qk_layernorm = getattr(args, "qk_layernorm", False)     # absent from the hand-made args
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, qk_layernorm=qk_layernorm,
        layernorm_zero_centered_gamma=getattr(args, "apply_layernorm_1p", False))
    return GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=qk_layernorm), vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    rotary_percent=args.rotary_percent, rope_scaling=getattr(args, "use_rope_scaling", False),
                    rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage()).eval()


def _mcore_logits(model, tokens):
    """This rank's share of the logits [b, s, padded vocab / tp] on the last pipeline stage (None on the
    others): each stage's hidden states [s, b, h] are sent to the next stage's rank of the same TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    seq = tokens.shape[1]
    positions = torch.arange(seq).expand_as(tokens)
    masked = torch.ones(seq, seq).triu(1).bool()[None, None]       # Megatron's mask: True where not attended
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(seq, tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, positions, masked)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out.float()


def _gathered(results):
    """The full logits [b, s, vocab] from every rank's share (the last stage's TP ranks, in rank order)."""
    return torch.cat([part for part in results if part is not None], dim=-1)[..., :VOCAB]


def _megalite_logits(rank, world_size, root):
    from megalite.checkpoint.merge import load_model
    model, _ = load_model(root)
    with torch.no_grad():
        return model(TOKENS).float().permute(1, 0, 2)[..., :VOCAB]


def _iteration_folder(root):
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(root, "iter_" + f.read().strip().zfill(7))


def _legacy_file(folder, pp):
    """This rank's file in Megatron-LM's legacy layout (mp_rank_TT at PP=1, mp_rank_TT_PPP otherwise)."""
    from megatron.core import parallel_state
    name = f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}"
    if pp > 1:
        name += f"_{parallel_state.get_pipeline_model_parallel_rank():03d}"
    return os.path.join(folder, name, "model_optim_rng.pt")


def _exported_into_mcore(rank, world_size, root, ckpt_format, tp, pp):
    """megatron-core's logits of megalite's export at ``root``, loaded as Megatron-LM loads each format."""
    from megatron.core import dist_checkpointing

    folder = _iteration_folder(root)
    if ckpt_format == "torch":
        saved = torch.load(os.path.join(folder, "mp_rank_00" + ("_000" if pp > 1 else ""), "model_optim_rng.pt"),
                           weights_only=False)
        assert saved["checkpoint_version"] == 3.0
        model = _mcore_model(saved["args"], tp, pp)
        model.load_state_dict(torch.load(_legacy_file(folder, pp), weights_only=False)["model"], strict=True)
    else:
        model = _mcore_model(dist_checkpointing.load_common_state_dict(folder)["args"], tp, pp)
        # As Megatron-LM loads: the model's sharded state under "model", the common state beside it.
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, folder)
        model.load_state_dict(loaded["model"], strict=True)
    return _mcore_logits(model, TOKENS)


LAYOUTS = {"tp1pp1": (1, 1), "tp2pp2": (2, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
@pytest.mark.parametrize("family", list(FAMILIES) + list(FAMILIES_CROSSED_ONLY))
def test_export_loads_into_megatron_core_with_the_same_logits(tmp_path, megalite_checkpoint, family, ckpt_format,
                                                               layout):
    tp, pp = LAYOUTS[layout]
    save, out = megalite_checkpoint(family), str(tmp_path / "megatron")
    # The legacy files are written at megatron-core's layout; torch_dist at TP=1, read by megatron-core at its own.
    sizes = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    assert convert(["--to", "megatron", "--load", save, "--save", out, "--ckpt-format", ckpt_format]
                   + (sizes if ckpt_format == "torch" else [])) == 0
    theirs = _gathered(run_on_ranks(_exported_into_mcore, tp * pp, out, ckpt_format, tp, pp, timeout=180))
    ours = run_on_ranks(_megalite_logits, 1, save, timeout=120)[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


def _hand_args(family, tp, pp):
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
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, hidden_dropout=0.0, attention_dropout=0.0)


def _mcore_saves(rank, world_size, root, family, ckpt_format, tp, pp, batch_tokens):
    """A randomly initialized megatron-core model at ``tp`` x ``pp`` saved by megatron-core's own code;
    this rank's logits of TOKENS and of ``batch_tokens``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    torch.manual_seed(5)                  # the same on every rank: replicated tensors stay equal
    args = _hand_args(family, tp, pp)
    model = _mcore_model(args, tp, pp)
    with torch.no_grad():                 # megatron-core zeroes biases and sets norms to one at init
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        if pp > 1 and not args.untie_embeddings_and_output_weights:    # the last stage's tied copy
            from megatron.core import parallel_state
            if parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage():
                weight = model.shared_embedding_or_output_weight()
                dist.all_reduce(weight, group=parallel_state.get_embedding_group())
                weight /= 2
    folder = os.path.join(root, "iter_0000007")
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 7}
    if ckpt_format == "torch":
        os.makedirs(os.path.dirname(_legacy_file(folder, pp)))
        torch.save({**common, "model": model.state_dict()}, _legacy_file(folder, pp))
    else:
        if rank == 0:
            os.makedirs(folder)
        dist.barrier()
        dist_checkpointing.save({**common, "model": model.sharded_state_dict()}, folder)
    if rank == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7")
    return _mcore_logits(model, TOKENS), _mcore_logits(model, batch_tokens)


def _megalite_loss(rank, world_size, argv):
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    run.scheduler.max_lr = run.scheduler.min_lr = 0.0            # measure, do not move
    return train_step(run)["loss"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_megatron_core_checkpoint_imports_with_its_logits_and_loss(tmp_path, family, ckpt_format, layout):
    tp, pp = LAYOUTS[layout]
    theirs_root, ours = str(tmp_path / "mcore"), str(tmp_path / "imported")
    os.makedirs(theirs_root)
    from megalite.data.gpt_dataset import MockGPTDataset
    batch = [MockGPTDataset(VOCAB, 16, 4, 1234)[i] for i in range(4)]     # megalite's first mock batch
    tokens, labels, mask = (torch.stack([torch.from_numpy(b[key]) for b in batch]) for key in
                            ("tokens", "labels", "loss_mask"))
    results = run_on_ranks(_mcore_saves, tp * pp, theirs_root, family, ckpt_format, tp, pp, tokens, timeout=180)
    theirs, batch_logits = (_gathered([result[i] for result in results]) for i in (0, 1))
    assert convert(["--from", "megatron", "--load", theirs_root, "--save", ours]) == 0
    torch.testing.assert_close(run_on_ranks(_megalite_logits, 1, ours, timeout=120)[0], theirs, rtol=0, atol=ATOL)
    # megalite's loss at TP=2 x PP=2 (resharded from the one-rank import) against the cross entropy
    # of megatron-core's logits of the same batch.
    per_token = torch.nn.functional.cross_entropy(batch_logits.reshape(-1, VOCAB), labels.reshape(-1),
                                                  reduction="none")
    expected = ((per_token * mask.reshape(-1)).sum() / mask.sum()).item()
    argv = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
            "--eval-iters", "0", "--load", ours, "--finetune", "--use-checkpoint-args",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    losses = run_on_ranks(_megalite_loss, 4, argv, timeout=180)
    assert losses[-1] == pytest.approx(expected, abs=ATOL)


def _megatron_lm_reads_args(rank, world_size, root, ckpt_format, fields=None):
    """Megatron-LM's own parse_args + load_args_from_checkpoint (--use-checkpoint-args) on ``root``: the
    model ``fields`` (READ_BACK's by default) it takes from the checkpoint."""
    import sys
    import types

    import torch.distributed as dist
    dist.destroy_process_group()          # read as one process (a group would make it all-reduce on CUDA)
    # Megatron-LM's training package imports a Triton kernel module at import time; no Triton on a CPU
    # machine, and nothing here calls it (this rank process only).
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *args, **kwargs: None
    sys.modules[stub.__name__] = stub
    from megatron.training.arguments import parse_args
    from megatron.training.checkpointing import load_args_from_checkpoint
    sys.argv = ["pretrain_gpt.py", "--load", root, "--use-checkpoint-args", "--ckpt-format", ckpt_format,
                "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]
    args, _ = load_args_from_checkpoint(parse_args())
    return {field: getattr(args, field) for field in fields or READ_BACK}


READ_BACK = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "group_query_attention", "kv_channels", "seq_length", "max_position_embeddings",
             "position_embedding_type", "rotary_base", "normalization", "swiglu",
             "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias", "padded_vocab_size")


def _have_megatron_training():
    try:
        import megatron.training  # noqa: F401
    except ImportError:     # absent, or its imports (Triton) fail: the test's rank stubs those
        import importlib.util
        try:
            return importlib.util.find_spec("megatron.training") is not None
        except ImportError:
            return False
    return True


@pytest.mark.skipif(not HAVE_MEGATRON_CORE or not _have_megatron_training(),
                    reason="Megatron-LM's megatron.training (from its source, tag core_v0.16.1) is not importable")
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_megatron_lm_reads_the_exported_args(tmp_path, megalite_checkpoint, ckpt_format):
    out = str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", megalite_checkpoint("llama"), "--save", out,
                    "--ckpt-format", ckpt_format]) == 0
    read = run_on_ranks(_megatron_lm_reads_args, 1, out, ckpt_format, timeout=180)[0]
    assert read == {**{field: getattr(_hand_args("llama", 1, 1), field) for field in READ_BACK}}
