"""The GPT and LLaMA-style models on one process: shapes, causality, learning, seeded init."""
import pytest
import torch

from megalite.config.settings import ModelConfig
from megalite.model import gpt
from megalite.model.gpt import GPTModel
from megalite.model.loss import language_model_loss
from megalite.parallel.param_info import param_info

GPT = dict()
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
             untie_embeddings_and_output_weights=True, add_bias_linear=False)
VARIANTS = {"gpt": GPT, "llama": LLAMA}


def tiny_config(variant="gpt", **overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                  vocab_size=50, make_vocab_size_divisible_by=16, hidden_dropout=0.0, attention_dropout=0.0, seed=7)
    fields.update(VARIANTS[variant])
    fields.update(overrides)
    return ModelConfig(**fields)


def tokens(batch=3, seq=16, vocab=50, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes(variant):
    config = tiny_config(variant)
    model = GPTModel(config)
    ids = tokens()
    loss = model(ids, labels=ids)
    assert loss.shape == (3, 16) and loss.dtype == torch.float32
    assert model(ids).shape == (16, 3, config.padded_vocab_size(1)) == (16, 3, 64)
    first = GPTModel(config, post_process=False, layer_numbers=[0])
    assert first(ids).shape == (16, 3, 32)                       # hidden states [s, b, h]
    last = GPTModel(config, pre_process=False, layer_numbers=[1])
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        last(None, labels=ids)
    last.set_input_tensor(first(ids))
    assert last(None, labels=ids).shape == (3, 16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_masking(variant):
    """Changing token j changes no output before position j, and does change position j."""
    model = GPTModel(tiny_config(variant))
    ids = tokens()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    before, after = model(ids), model(changed)                     # [s, b, v]
    assert torch.equal(before[:9], after[:9])
    assert not torch.allclose(before[9], after[9])


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(variant))
    ids = tokens(batch=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    mask = torch.ones(2, 16)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = language_model_loss(model(ids[:, :-1].contiguous(), labels=ids[:, 1:].contiguous()), mask[:, 1:]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # ln(50) = 3.9 at the start; memorizing 30 tokens drives it far down.
    assert losses[0] > 3.0 and losses[-1] < 0.3, losses[::8]


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_is_bit_reproducible_and_split_invariant(variant):
    config = tiny_config(variant, num_layers=3)
    full = GPTModel(config).state_dict()
    assert all(torch.equal(value, GPTModel(config).state_dict()[name]) for name, value in full.items())
    other_seed = GPTModel(tiny_config(variant, num_layers=3, seed=8)).state_dict()
    assert not torch.equal(full["decoder.layers.0.self_attention.linear_qkv.weight"],
                           other_seed["decoder.layers.0.self_attention.linear_qkv.weight"])
    # A pipeline chunk holding global layers 1-2 holds exactly the full model's layers 1-2 (and the output layer).
    last = GPTModel(config, pre_process=False, layer_numbers=[1, 2]).state_dict()
    for local, global_ in ((0, 1), (1, 2)):
        for name, value in last.items():
            if name.startswith(f"decoder.layers.{local}."):
                assert torch.equal(value, full[name.replace(f"layers.{local}.", f"layers.{global_}.")]), name
    assert torch.equal(last["output_layer.weight"], full["output_layer.weight"])
    # Vocabulary padding rows start at zero (they are never looked up nor predicted).
    assert torch.count_nonzero(full["embedding.word_embeddings.weight"][50:]) == 0


def test_tied_output_layer_is_the_embedding_and_marked_shared():
    model = GPTModel(tiny_config("gpt"))
    assert model.output_layer.weight is model.embedding.word_embeddings.weight
    assert param_info(model.output_layer.weight).shared_embedding
    last = GPTModel(tiny_config("gpt"), pre_process=False, layer_numbers=[1])
    assert param_info(last.output_layer.weight).shared_embedding
    assert torch.equal(last.output_layer.weight, model.embedding.word_embeddings.weight)
    untied = GPTModel(tiny_config("llama"))
    assert not param_info(untied.output_layer.weight).shared_embedding
    assert not torch.equal(untied.output_layer.weight[:50], untied.embedding.word_embeddings.weight[:50])


def test_parameter_attributes():
    model = GPTModel(tiny_config("gpt"))
    params = dict(model.named_parameters())
    qkv = params["decoder.layers.0.self_attention.linear_qkv.weight"]
    proj = params["decoder.layers.0.self_attention.linear_proj.weight"]
    assert param_info(qkv).tensor_parallel and param_info(qkv).partition_dim == 0
    assert param_info(proj).tensor_parallel and param_info(proj).partition_dim == 1
    assert not param_info(params["decoder.layers.0.input_norm.weight"]).tensor_parallel
    assert not param_info(params["decoder.layers.0.input_norm.weight"]).sequence_parallel   # SP off
    sp = {name: param_info(p) for name, p in GPTModel(tiny_config("gpt"), sequence_parallel=True).named_parameters()}
    assert sp["decoder.layers.0.input_norm.weight"].sequence_parallel
    assert sp["decoder.layers.0.mlp.linear_fc2.bias"].sequence_parallel
    assert not sp["decoder.layers.0.mlp.linear_fc1.bias"].sequence_parallel  # split over TP, not replicated


def test_rope_depends_only_on_relative_positions():
    """Shifting every position by the same offset leaves a RoPE model's outputs unchanged (to round-off);
    the learned-position GPT changes."""
    ids = tokens()
    positions = torch.arange(16).expand(3, 16)
    llama = GPTModel(tiny_config("llama", max_position_embeddings=64))
    gpt = GPTModel(tiny_config("gpt", max_position_embeddings=64))
    torch.testing.assert_close(llama(ids, positions + 37), llama(ids, positions), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(gpt(ids, positions + 37), gpt(ids, positions), atol=1e-3)


def test_language_model_loss_weights_by_mask():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    assert language_model_loss(loss, mask).mean.item() == pytest.approx((1 + 2 + 5) / 3)


def test_grouped_query_attention_needs_tp_to_divide_the_groups():
    with pytest.raises(ValueError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        tiny_config("llama").check_tensor_parallel(4)


def test_sequence_parallel_needs_tp_to_divide_the_sequence():
    tiny_config("gpt", seq_length=10).check_tensor_parallel(4)     # no sequence parallelism: no rule
    with pytest.raises(ValueError, match="--sequence-parallel needs --seq-length 10 divisible by "
                                         "--tensor-model-parallel-size 4"):
        tiny_config("gpt", seq_length=10).check_tensor_parallel(4, sequence_parallel=True)


def test_model_takes_its_tp_size_from_the_grid_and_refuses_one_that_does_not_divide_it(monkeypatch):
    assert GPTModel(tiny_config("gpt")).output_layer.weight.shape[0] == tiny_config("gpt").padded_vocab_size(1)
    monkeypatch.setattr(gpt, "tp_size", lambda: 4)     # as a grid of TP 4 would say
    with pytest.raises(ValueError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        GPTModel(tiny_config("llama"))
