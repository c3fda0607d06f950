"""Mixture-of-experts models through Hugging Face (megalite/checkpoint/hf_moe.py): a tiny random Mixtral,
Qwen2-MoE or Qwen3-MoE from transformers, with peaked attention and decisive routing (router and experts
scaled), gives transformers' logits and loss in megalite (float32, 1e-5) whether its experts come saved one
by one or stacked; a swapped gate/up, a reversed expert order, the other router normalization or a swapped
shared expert moves the logits by more than 1e-4; HF -> megalite -> HF gives back the saved tensors; a
megalite MoE model exports to a folder transformers loads with megalite's logits, and imports back to the
same tensors."""
import os

import pytest
import torch

from megalite.checkpoint.hf import from_hf, to_hf
from megalite.model.gpt import GPTModel
from tests.checkpoint.hf_models import (
    ATOL,
    MLP_GAIN,
    VOCAB,
    WRONG,
    hf_logits_and_loss,
    import_folder,
    megalite_logits_and_loss,
    peak_hf_attention,
    save_hf,
    tokens_and_positions,
)
from tests.checkpoint.test_hf_export import LLAMA, build_megalite, export

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, max_position_embeddings=16384, bos_token_id=0, eos_token_id=0)
QWEN3_MOE = dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=16)
QWEN2_MOE = dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, shared_expert_intermediate_size=20)
# name: (transformers family, config fields, megalite's --moe-router-pre-softmax for it)
HF_VARIANTS = {
    "mixtral": ("Mixtral", dict(num_local_experts=4, intermediate_size=24, router_aux_loss_coef=0.02), False),
    "qwen3-moe-norm-topk": ("Qwen3Moe", dict(QWEN3_MOE, norm_topk_prob=True), False),
    "qwen3-moe-pre-softmax": ("Qwen3Moe", dict(QWEN3_MOE, norm_topk_prob=False, tie_word_embeddings=True), True),
    "qwen2-moe": ("Qwen2Moe", dict(QWEN2_MOE, norm_topk_prob=False), True),
    "qwen2-moe-norm-topk-no-qkv-bias": ("Qwen2Moe", dict(QWEN2_MOE, norm_topk_prob=True, qkv_bias=False), False),
    # dense layers among the MoE ones: --moe-layer-freq [0, 1] and [1, 0]
    "qwen3-moe-sparse-step-2": ("Qwen3Moe", dict(QWEN3_MOE, norm_topk_prob=True, decoder_sparse_step=2), False),
    "qwen2-moe-mlp-only-layer-1": ("Qwen2Moe", dict(QWEN2_MOE, norm_topk_prob=False, mlp_only_layers=[1]), True),
}
LAYER_PATTERNS = {"qwen3-moe-sparse-step-2": [0, 1], "qwen2-moe-mlp-only-layer-1": [1, 0]}
# Router logits O(10): the chosen experts and their weights far from even, so a wrong routing shows.
ROUTER_GAIN = 20.0


def build_hf_moe(kind: str, fields: dict):
    torch.manual_seed(5)
    config = getattr(transformers, f"{kind}Config")(**{**SHAPE, **fields})
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape))
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.mul_(ROUTER_GAIN)
            elif ".experts." in name or ".shared_expert." in name:
                param.mul_(MLP_GAIN)
    peak_hf_attention(model)
    return model


def _swap_gate_and_up(state):
    for name, weight in state.items():
        if name.endswith("experts.weight1"):
            state[name] = torch.stack([weight[..., 1::2], weight[..., 0::2]], -1).flatten(-2)


def _swap_shared_gate_and_up(state):
    for name, weight in state.items():
        if name.endswith("shared_expert.linear_fc1.weight"):
            state[name] = torch.stack([weight[1::2], weight[0::2]], 1).flatten(0, 1)


def _reverse_experts(state):
    for name, weight in state.items():
        if name.endswith(("experts.weight1", "experts.weight2")):
            state[name] = weight.flip(0)


def _other_normalization(config):
    import dataclasses
    return dataclasses.replace(config, moe_router_pre_softmax=not config.moe_router_pre_softmax)


def _logits(config, state, ids, positions, labels):
    model = GPTModel(config).eval()
    model.load_state_dict(state, strict=True)
    return megalite_logits_and_loss(model, ids, positions, labels)[0]


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_import_gives_transformers_logits_and_loss_and_exports_the_saved_tensors(tmp_path, variant):
    from safetensors.torch import load_file
    kind, fields, pre_softmax = HF_VARIANTS[variant]
    hf_model = build_hf_moe(kind, fields)
    folder = save_hf(hf_model, str(tmp_path / "hf"))
    ours, config = import_folder(folder)
    assert (config.num_experts, config.moe_router_topk, config.moe_router_pre_softmax) == (4, 2, pre_softmax)
    assert config.moe_ffn_hidden_size == 24 and config.moe_aux_loss_coeff == hf_model.config.router_aux_loss_coef
    assert config.moe_layer_freq == LAYER_PATTERNS.get(variant, 1)
    ids, positions, labels = tokens_and_positions(True)
    theirs, their_loss = hf_logits_and_loss(hf_model, ids, positions, labels)
    logits, loss = megalite_logits_and_loss(ours, ids, positions, labels)
    torch.testing.assert_close(logits, theirs, rtol=0, atol=ATOL)
    assert loss == pytest.approx(their_loss, abs=ATOL)
    state = dict(ours.state_dict())
    # The stacked tensors of transformers' own state dict import to the same tensors.
    _, stacked = from_hf(hf_model.config, dict(hf_model.state_dict()))
    assert stacked.keys() == state.keys() and all(torch.equal(stacked[name], state[name]) for name in state)
    # HF -> megalite -> HF: the saved files' tensors and names, exactly.
    saved, (hf_config, exported) = load_file(os.path.join(folder, "model.safetensors")), to_hf(state, config)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[name], saved[name]) for name in saved)
    assert hf_config["architectures"] == hf_model.config.architectures
    # Sensitivity: each silent mistake gives other logits.
    shared = config.moe_shared_expert_intermediate_size is not None
    for mistake in (_swap_gate_and_up, _reverse_experts) + ((_swap_shared_gate_and_up,) if shared else ()):
        wrong = dict(state)
        mistake(wrong)
        assert (_logits(config, wrong, ids, positions, labels) - theirs).abs().max().item() > WRONG, mistake
    wrong = _logits(_other_normalization(config), state, ids, positions, labels)
    assert (wrong - theirs).abs().max().item() > WRONG


MOE = dict(LLAMA, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.01)
# name: (ModelConfig fields, the Hugging Face architecture it must export as)
EXPORTS = {
    "mixtral": (dict(MOE, untie_embeddings_and_output_weights=True), "MixtralForCausalLM"),
    "mixtral-tied-top1": (dict(MOE, moe_router_topk=1), "MixtralForCausalLM"),
    "qwen3-moe": (dict(MOE, qk_layernorm=True, kv_channels=16), "Qwen3MoeForCausalLM"),
    "qwen3-moe-pre-softmax": (dict(MOE, qk_layernorm=True, moe_router_pre_softmax=True), "Qwen3MoeForCausalLM"),
    "qwen2-moe": (dict(MOE, add_qkv_bias=True, moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True,
                       moe_router_pre_softmax=True), "Qwen2MoeForCausalLM"),
    "qwen2-moe-no-qkv-bias": (dict(MOE, moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True,
                                   untie_embeddings_and_output_weights=True), "Qwen2MoeForCausalLM"),
    "qwen3-moe-dense-first-layer": (dict(MOE, qk_layernorm=True, moe_layer_freq=[0, 1]), "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("variant", EXPORTS)
def test_export_gives_megalite_logits_in_transformers_and_imports_back(tmp_path, variant):
    fields, architecture = EXPORTS[variant]
    ours = build_megalite(fields)   # the router and the experts scaled by MLP_GAIN with the dense MLPs
    folder = export(ours, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids, positions, labels = tokens_and_positions(True)
    their_logits, their_loss = hf_logits_and_loss(theirs, ids, positions, labels)
    logits, loss = megalite_logits_and_loss(ours, ids, positions, labels)
    torch.testing.assert_close(their_logits, logits, rtol=0, atol=ATOL)
    assert their_loss == pytest.approx(loss, abs=ATOL)
    # Back through import: the same tensors (the vocabulary's padding comes back as zeros).
    again, config = import_folder(folder)
    assert (config.moe_router_pre_softmax, config.moe_aux_loss_coeff) == (ours.config.moe_router_pre_softmax, 0.01)
    assert config.moe_layer_freq == ours.config.moe_layer_freq
    for name, tensor in ours.state_dict().items():
        if "word_embeddings" not in name and "output_layer" not in name:
            assert torch.equal(again.state_dict()[name], tensor), name


def test_the_command_round_trips_a_mixtral_through_a_megalite_checkpoint(tmp_path):
    """--from hf writes a one-rank MoE checkpoint; --to hf merges it back into the same safetensors tensors."""
    from safetensors.torch import load_file

    from megalite.checkpoint.hf import main as convert
    kind, fields, _ = HF_VARIANTS["mixtral"]
    folder = save_hf(build_hf_moe(kind, fields), str(tmp_path / "hf"))
    checkpoint, back = str(tmp_path / "megalite"), str(tmp_path / "back")
    assert convert(["--from", "hf", "--load", folder, "--save", checkpoint]) == 0
    assert convert(["--to", "hf", "--load", checkpoint, "--save", back, "--skip-tokenizer"]) == 0
    saved, again = (load_file(os.path.join(path, "model.safetensors")) for path in (folder, back))
    assert again.keys() == saved.keys() and all(torch.equal(again[name], saved[name]) for name in saved)
