"""MoE checkpoints crossed with megatron-core itself (code nobody here wrote), on CPU over gloo with the local
layer spec and SequentialMLP experts: megalite's export of an MoE model (a megalite checkpoint trained at
DP2 x EP2, its routers made decisive) loads with strict=True into megatron-core's GPTModel at EP1, EP2 and
TP2 x EP2 (expert TP 1) and gives megalite's logits, and Megatron-LM's own argument loader reads its MoE
args; a megatron-core MoE model's own state dicts, saved per rank in Megatron-LM's legacy layout at EP2
(mp_rank_00_00E), import into megalite with megatron-core's logits.

Decisive routing: the routers' weights are scaled (by ROUTER_SCALE) so that each token's k-th and (k+1)-th
selection scores lie more than 1e-3 apart (asserted), far beyond float32 round-off between the two
implementations, so no choice can differ; an export that put an expert under another's index, or swapped
SwiGLU's gate and up, moves the logits by far more than the tolerance (the export test mutates its files
and shows it).  megatron-core's TEGroupedMLP (the
grouped layout) needs Transformer Engine and is not built here.

Needs megatron-core (tested with 0.16.1); skipped where it is not importable.  The rank processes answer
megatron-core's unconditional CUDA calls for CPU as test_megatron_core.py's ``_cpu_only`` does.
"""
import argparse
import os

import pytest
import torch

from megalite.checkpoint.convert import main as convert
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_megatron_core import (
    ATOL,
    HAVE_MEGATRON_CORE,
    _cpu_only,
    _have_megatron_training,
    _iteration_folder,
    _megatron_lm_reads_args,
)

pytestmark = pytest.mark.skipif(not HAVE_MEGATRON_CORE, reason="megatron-core is not installed (docs/megatron.md)")

VOCAB = 100
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def moe_hand_args(tp=1, pp=1, ep=1, bias=False):
    """The args Megatron-LM's save_checkpoint would store for the test's MoE model (a LLaMA-style model,
    4 experts top-2 in every layer with a gated shared expert, sigmoid scores and the expert bias), written
    here from Megatron-LM's flag names; ``bias``: every linear with a bias (the experts' own fc1 / fc2 biases,
    the router's), and no shared expert (megatron-core's have no bias)."""
    args = argparse.Namespace(
        num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
        group_query_attention=True, kv_channels=8, seq_length=16, max_position_embeddings=16, padded_vocab_size=128,
        vocab_size=VOCAB, make_vocab_size_divisible_by=64, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        openai_gelu=False, position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, hidden_dropout=0.0, attention_dropout=0.0,
        transformer_impl="local", num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_layer_freq=1,
        moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2, moe_router_pre_softmax=False,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=None,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1)
    if bias:
        vars(args).update(add_bias_linear=True, add_qkv_bias=True, moe_shared_expert_intermediate_size=None,
                          moe_shared_expert_gate=False)
    return args


def _cpu_only_moe():
    """test_megatron_core.py's ``_cpu_only``, and: megatron-core 0.16.1's moe_utils names Transformer Engine's
    ``te_general_gemm`` in the router's linear but defines it only when Transformer Engine imports; without it
    the name is set to None, the value megatron-core's own Transformer Engine module gives it when TE is absent
    (the router then computes ``x W^T`` with torch.mm)."""
    from megatron.core.transformer.moe import moe_utils
    _cpu_only()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def mcore_moe_model(args, tp=1, pp=1, ep=1):
    """This rank's stage of megatron-core's MoE GPTModel (local spec, SequentialMLP, float32, CPU) from
    Megatron-LM ``args`` as core_transformer_config_from_args reads them."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    _cpu_only_moe()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep,
                                                 expert_tensor_parallel_size=1)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, bias_dropout_fusion=False,
        bias_activation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_layer_freq=args.moe_layer_freq,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
    return GPTModel(config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage()).eval()


def _mcore_logits(model, tokens):
    """The logits [b, s, padded vocab] of one pipeline stage holding the whole model (TP 1)."""
    seq = tokens.shape[1]
    positions = torch.arange(seq).expand_as(tokens)
    masked = torch.ones(seq, seq).triu(1).bool()[None, None]
    with torch.no_grad():
        return model(tokens, positions, masked).float()


ROUTER_SCALE = 10.0     # the routers' weights times this: every token's k-th and (k+1)-th scores far apart


def _decisive(rank, world_size, root, out):
    """A one-rank copy of the checkpoint at ``root`` with its routers' weights scaled by ROUTER_SCALE."""
    from megalite.checkpoint.imported import save_one_rank
    from megalite.checkpoint.merge import merge_checkpoint
    from megalite.config.settings import ModelConfig
    state, settings = merge_checkpoint(root)
    for name in state:
        if name.endswith("mlp.router.weight"):
            state[name] = state[name] * ROUTER_SCALE
    save_one_rank(ModelConfig.from_saved(settings["model"]), state, out)


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory, megalite_moe_checkpoint):
    out = str(tmp_path_factory.mktemp("decisive") / "ckpt")
    run_on_ranks(_decisive, 1, megalite_moe_checkpoint, out, timeout=120)
    return out


def _megalite_logits_and_margin(rank, world_size, root):
    """megalite's logits [b, s, vocab] of TOKENS and the smallest gap, over every token and MoE layer, between
    a token's k-th and (k+1)-th selection scores (sigmoid of the logits plus the expert bias)."""
    from megalite.checkpoint.merge import load_model
    model, _ = load_model(root)
    gaps = []

    def record(router, inputs, output):
        scores = torch.sigmoid(inputs[0].reshape(-1, router.weight.shape[1]) @ router.weight.t()) + router.expert_bias
        top = scores.topk(router.config.moe_router_topk + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min())
    for layer in model.decoder.layers:
        if hasattr(layer.mlp, "router"):                   # an MoE layer
            layer.mlp.router.register_forward_hook(record)
    with torch.no_grad():
        logits = model(TOKENS).float().permute(1, 0, 2)[..., :VOCAB]
    return logits, min(gaps).item()


def _legacy_file(folder, ep):
    from megatron.core import parallel_state
    name = f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}"
    if ep > 1:
        name += f"_{parallel_state.get_expert_model_parallel_rank():03d}"
    return os.path.join(folder, name, "model_optim_rng.pt")


def _export_into_mcore(rank, world_size, root, tp, ep):
    """This rank's share [b, s, padded vocab / tp] of megatron-core's logits of the export at ``root`` loaded
    strictly; then with experts 0 and 1 of layer 0 exchanged, and with SwiGLU's gate and up halves of expert 0
    exchanged (mutations that must show)."""
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    saved = torch.load(_legacy_file(_iteration_folder(root), ep), weights_only=False)
    model = mcore_moe_model(saved["args"], tp, 1, ep)
    model.load_state_dict(saved["model"], strict=True)
    logits = [_mcore_logits(model, TOKENS)]
    prefix = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
    model_state = saved["model"]
    swapped = {**model_state, prefix.format(0): model_state[prefix.format(1)],
               prefix.format(1): model_state[prefix.format(0)]}
    gate, up = model_state[prefix.format(0)].chunk(2)
    halves = {**model_state, prefix.format(0): torch.cat([up, gate])}
    for mutated in (swapped, halves):
        model.load_state_dict(mutated, strict=True)
        logits.append(_mcore_logits(model, TOKENS))
    return logits


@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 2), (2, 2)])
def test_moe_export_loads_into_megatron_core_with_the_same_logits(tmp_path, decisive_checkpoint, tp, ep):
    """At TP2 x EP2 (expert TP 1, two ranks: TP rank r is EP rank r) each rank holds half the vocabulary's
    logits and its shards of attention, dense and shared-expert weights; the routed experts are whole."""
    out = str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", decisive_checkpoint, "--save", out,
                    "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep)]) == 0
    ours, margin = run_on_ranks(_megalite_logits_and_margin, 1, decisive_checkpoint, timeout=120)[0]
    assert margin > 1e-3, margin            # no choice within float32 round-off of another
    shares = run_on_ranks(_export_into_mcore, max(tp, ep), out, tp, ep, timeout=240)
    if tp == 1:
        runs = shares                       # each rank's own logits
    else:                                   # the TP ranks' halves of the vocabulary joined
        runs = [[torch.cat(parts, dim=-1) for parts in zip(*shares)]]
    for exact, swapped, halves in runs:
        torch.testing.assert_close(exact[..., :VOCAB], ours, rtol=0, atol=ATOL)
        for mutated in (swapped, halves):
            assert (mutated[..., :VOCAB] - ours).abs().max() > 100 * ATOL


# Models built from moe_hand_args without training: every linear with a bias; experts in layer 0 only, a dense
# MLP in layer 1 (--moe-layer-freq [1,0]).
VARIANTS = {"biases": {"bias": True}, "layer-list": {"moe_layer_freq": [1, 0]}}


def _random_checkpoint(rank, world_size, out, variant):
    """A one-rank megalite checkpoint of a VARIANTS model, every tensor perturbed (biases and expert biases
    off zero), its routers decisive."""
    from megalite.checkpoint.imported import save_one_rank
    from megalite.checkpoint.megatron_args import config_from_args
    from megalite.model.gpt import GPTModel
    changes = dict(VARIANTS[variant])
    args = moe_hand_args(bias=changes.pop("bias", False))
    vars(args).update(changes)
    config = config_from_args(args)
    torch.manual_seed(3)
    state = GPTModel(config).state_dict()
    for name, tensor in state.items():
        state[name] = tensor + torch.randn_like(tensor) * (0.01 if name.endswith("expert_bias") else 0.05)
        if name.endswith("router.weight"):
            state[name] = state[name] * ROUTER_SCALE
    save_one_rank(config, state, out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_variants_load_into_megatron_core_with_the_same_logits(tmp_path, variant):
    """At EP2: the experts' own fc1 / fc2 biases (fc2's scaled by the routing weight with its output, in both)
    and megatron-core's router bias (exported as zeros); a dense layer beside an MoE layer."""
    ours_root, out = str(tmp_path / "megalite"), str(tmp_path / "megatron")
    run_on_ranks(_random_checkpoint, 1, ours_root, variant, timeout=120)
    assert convert(["--to", "megatron", "--load", ours_root, "--save", out, "--expert-model-parallel-size", "2"]) == 0
    ours, margin = run_on_ranks(_megalite_logits_and_margin, 1, ours_root, timeout=120)[0]
    assert margin > 1e-3, margin
    for exact, swapped, halves in run_on_ranks(_export_into_mcore, 2, out, 1, 2, timeout=240):
        torch.testing.assert_close(exact[..., :VOCAB], ours, rtol=0, atol=ATOL)
        assert (swapped[..., :VOCAB] - ours).abs().max() > 100 * ATOL


def _mcore_saves(rank, world_size, root, tp, ep):
    """A randomly initialized megatron-core MoE model at TP ``tp`` x EP ``ep`` (expert TP 1) saved per rank in
    Megatron-LM's legacy layout (each rank's state_dict, its experts under local indices: at TP2 x EP2 on two
    ranks only mp_rank_00_000 and mp_rank_01_001), its routers decisive and its expert biases off zero; this
    rank's share [b, s, padded vocab / tp] of the logits of TOKENS."""
    from megatron.core import parallel_state
    args = moe_hand_args(tp=tp, ep=ep)
    torch.manual_seed(3)                  # megatron-core's CPU init draws from torch's global generator
    model = mcore_moe_model(args, tp, 1, ep)
    own = torch.Generator().manual_seed(100 + parallel_state.get_expert_model_parallel_rank())
    torch.manual_seed(5)                  # the same on every rank: replicated tensors stay equal
    with torch.no_grad():                 # megatron-core zeroes biases and sets norms to one at init
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            noise = torch.randn(tensor.shape, generator=own if "local_experts" in name else None)
            tensor.add_(noise * (0.01 if name.endswith("expert_bias") else 0.05))
            if name.endswith("router.weight"):
                tensor.mul_(ROUTER_SCALE)
    folder = os.path.join(root, "iter_0000007")
    path = _legacy_file(folder, ep)
    os.makedirs(os.path.dirname(path))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7, "model": model.state_dict()}, path)
    if rank == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7")
    return _mcore_logits(model, TOKENS)


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
def test_megatron_core_moe_checkpoint_imports_with_its_logits(tmp_path, tp, ep):
    theirs_root, ours = str(tmp_path / "mcore"), str(tmp_path / "imported")
    os.makedirs(theirs_root)
    shares = run_on_ranks(_mcore_saves, max(tp, ep), theirs_root, tp, ep, timeout=240)
    if tp == 1:                             # each EP rank's logits of the same tokens
        torch.testing.assert_close(shares[1], shares[0], rtol=0, atol=ATOL)
    theirs = torch.cat(shares, dim=-1) if tp > 1 else shares[0]
    written = sorted(os.listdir(os.path.join(theirs_root, "iter_0000007")))    # TP rank r is EP rank r at TP2
    assert written == (["mp_rank_00_000", "mp_rank_01_001"] if tp > 1 else ["mp_rank_00_000", "mp_rank_00_001"])
    assert convert(["--from", "megatron", "--load", theirs_root, "--save", ours]) == 0
    logits, margin = run_on_ranks(_megalite_logits_and_margin, 1, ours, timeout=120)[0]
    assert margin > 1e-3, margin
    torch.testing.assert_close(logits, theirs[..., :VOCAB], rtol=0, atol=ATOL)


# The MoE fields Megatron-LM's load_args_from_checkpoint takes from a checkpoint (tag core_v0.16.1).
MOE_READ_BACK = ("num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk", "moe_token_dispatcher_type",
                 "moe_router_pre_softmax", "moe_grouped_gemm", "moe_shared_expert_intermediate_size",
                 "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor")


@pytest.mark.skipif(not HAVE_MEGATRON_CORE or not _have_megatron_training(),
                    reason="Megatron-LM's megatron.training (from its source, tag core_v0.16.1) is not importable")
def test_megatron_lm_reads_the_exported_moe_args(tmp_path, megalite_moe_checkpoint):
    """Megatron-LM's --use-checkpoint-args finds EP rank 0's file of an EP2 export (mp_rank_00_000) and reads
    every MoE field it takes from a checkpoint."""
    out = str(tmp_path / "megatron")
    assert convert(["--to", "megatron", "--load", megalite_moe_checkpoint, "--save", out,
                    "--expert-model-parallel-size", "2"]) == 0
    read = run_on_ranks(_megatron_lm_reads_args, 1, out, "torch", MOE_READ_BACK, timeout=180)[0]
    expected = vars(moe_hand_args())
    assert read == {field: expected.get(field) for field in MOE_READ_BACK}
