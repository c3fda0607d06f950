"""Activation recompute with dropout on: outputs and gradients equal the run without recompute, bit
for bit, because every RNG stream is replayed; and recompute really keeps fewer activations."""
import pytest
import torch

from megalite.model.gpt import GPTModel
from megalite.model.loss import language_model_loss
from megalite.parallel import random as tp_random
from megalite.parallel import state
from megalite.parallel.testing import run_on_ranks
from tests.parallel.tp_harness import RECOMPUTE, batch, model_config

DROPOUT = dict(hidden_dropout=0.2, attention_dropout=0.2)


def _loss_grads_saved(config, seed=5, sequence_parallel=False):
    """(loss, {name: grad}, bytes of activations saved for backward) of one forward/backward in train mode."""
    model = GPTModel(config, sequence_parallel=sequence_parallel).train()
    tokens, positions, labels = batch(config)
    tp_random.model_parallel_seed(seed)
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_token = model(tokens, positions, labels=labels)
        loss = language_model_loss(per_token, torch.ones_like(labels, dtype=torch.float32)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved.values())


def _all_modes(variant, sp=False):
    return {mode: _loss_grads_saved(model_config(variant, mode, num_layers=3, **DROPOUT), sequence_parallel=sp)
            for mode in RECOMPUTE}


def _assert_recompute_is_exact(runs):
    loss, grads, saved = runs["none"]
    for mode, (m_loss, m_grads, m_saved) in runs.items():
        assert torch.equal(m_loss, loss), mode
        for name, grad in grads.items():
            assert torch.equal(m_grads[name], grad), (mode, name)
        if mode != "none":
            assert m_saved < saved, (mode, m_saved, saved)   # it did recompute something


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_recompute_with_dropout_is_exact_on_one_rank(variant):
    runs = _all_modes(variant)
    _assert_recompute_is_exact(runs)
    # Dropout is really on: another seed gives another loss.
    other = _loss_grads_saved(model_config(variant, num_layers=3, **DROPOUT), seed=6)[0]
    assert not torch.equal(other, runs["none"][0])
    # Full recompute keeps a span's input only: far less than selective, which keeps the layers' matmul inputs.
    assert runs["full-uniform"][2] < runs["selective"][2] < runs["none"][2]


def _tp2_sp(rank, world_size):
    state.initialize_grid(tp=2)
    return _all_modes("llama", sp=True)


def test_recompute_with_dropout_is_exact_under_tp_and_sequence_parallel():
    for runs in run_on_ranks(_tp2_sp, 2):
        _assert_recompute_is_exact(runs)
