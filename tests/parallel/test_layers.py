"""Tensor-parallel layers equal their one-process definitions (outputs and all gradients)."""
import pytest
import torch
import torch.nn.functional as F

from megalite.parallel import state
from megalite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    initialize_from_seed,
    name_seed,
    vocab_parallel_cross_entropy,
)
from megalite.parallel.param_info import Init
from megalite.parallel.testing import run_on_ranks

S, B, H, FFN, VOCAB, PADDED = 4, 2, 6, 8, 13, 16


def _data():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(S, B, H, generator=g), "w1": torch.randn(FFN, H, generator=g),
            "b1": torch.randn(FFN, generator=g), "w2": torch.randn(H, FFN, generator=g),
            "b2": torch.randn(H, generator=g),
            "ids": torch.randint(0, VOCAB, (S, B), generator=g), "table": torch.randn(PADDED, H, generator=g),
            "logits": torch.randn(S, B, PADDED, generator=g) * 3, "upstream": torch.randn(S, B, H, generator=g)}


def _reference_mlp(d):
    """Dense: y = W2 gelu(W1 x + b1) + b2, and the grads of x and of every weight."""
    x, w1, b1, w2, b2 = (d[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2"))
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    y.backward(d["upstream"])
    return y.detach(), x.grad, w1.grad, b1.grad, w2.grad, b2.grad


def _parallel_mlp(d, rank, tp, sequence_parallel=False, gather_between=False):
    """Column -> Row on this rank's slices; returns full-shape results for comparison."""
    column = ColumnParallelLinear(H, FFN, sequence_parallel=sequence_parallel, gather_output=gather_between)
    row = RowParallelLinear(FFN, H, sequence_parallel=sequence_parallel, input_is_parallel=not gather_between)
    rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
    tokens = slice(rank * S // tp, (rank + 1) * S // tp) if sequence_parallel else slice(None)
    with torch.no_grad():
        column.weight.copy_(d["w1"][rows]), column.bias.copy_(d["b1"][rows])
        row.weight.copy_(d["w2"][:, rows]), row.bias.copy_(d["b2"])
    x = d["x"][tokens].clone().requires_grad_()
    y = row(F.gelu(column(x)))
    y.backward(d["upstream"][tokens])
    return y.detach(), x.grad, column.weight.grad, column.bias.grad, row.weight.grad, row.bias.grad


def _run_layers(rank, world_size):
    tp = world_size
    state.initialize_grid(tp=tp)
    d = _data()
    out = {"mlp": _parallel_mlp(d, rank, tp), "mlp_sp": _parallel_mlp(d, rank, tp, sequence_parallel=True),
           "mlp_gathered": _parallel_mlp(d, rank, tp, gather_between=True)}

    embedding = VocabParallelEmbedding(PADDED, H)
    with torch.no_grad():
        embedding.weight.copy_(d["table"].chunk(tp)[rank])
    emb = embedding(d["ids"])
    emb.backward(d["upstream"])
    out["embedding"] = (emb.detach(), embedding.weight.grad)

    for smoothing in (0.0, 0.1):
        logits = d["logits"].chunk(tp, dim=-1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, d["ids"], vocab_size=VOCAB, label_smoothing=smoothing)
        loss.sum().backward()
        out[f"ce{smoothing}"] = (loss.detach(), logits.grad)

    column = ColumnParallelLinear(H, FFN, init=Init("normal", 0.5))
    initialize_from_seed([("some.layer.weight", column.weight), ("some.layer.bias", column.bias)], seed=3)
    out["init"] = column.weight.detach().clone()
    try:
        ColumnParallelLinear(4, 7)
    except ValueError as error:
        out["refusal"] = str(error)
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_on_ranks(_run_layers, 2)


@pytest.mark.parametrize("layout", ["mlp", "mlp_sp", "mlp_gathered"])
def test_column_then_row_parallel_equals_dense_mlp(tp2, layout):
    y, dx, dw1, db1, dw2, db2 = _reference_mlp(_data())
    tp = len(tp2)
    for rank, results in enumerate(tp2):
        p_y, p_dx, p_dw1, p_db1, p_dw2, p_db2 = results[layout]
        rows = slice(rank * FFN // tp, (rank + 1) * FFN // tp)
        tokens = slice(rank * S // tp, (rank + 1) * S // tp) if layout == "mlp_sp" else slice(None)
        torch.testing.assert_close(p_y, y[tokens])
        torch.testing.assert_close(p_dx, dx[tokens])
        torch.testing.assert_close(p_dw1, dw1[rows])
        torch.testing.assert_close(p_db1, db1[rows])
        torch.testing.assert_close(p_dw2, dw2[:, rows])
        # Under SP the row-parallel bias saw only this rank's tokens: summed over TP it is the full grad.
        if layout == "mlp_sp":
            p_db2 = sum(r[layout][5] for r in tp2)
        torch.testing.assert_close(p_db2, db2)


def test_vocab_parallel_embedding_equals_lookup(tp2):
    d = _data()
    table = d["table"].clone().requires_grad_()
    emb = F.embedding(d["ids"], table)
    emb.backward(d["upstream"])
    for rank, results in enumerate(tp2):
        out, grad = results["embedding"]
        assert torch.equal(out, emb.detach())      # exactly one rank contributes each row: no round-off
        torch.testing.assert_close(grad, table.grad.chunk(len(tp2))[rank])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_vocab_parallel_cross_entropy_equals_torch_and_ignores_padding(tp2, smoothing):
    d = _data()
    logits = d["logits"].clone().requires_grad_()
    # Reference: only the real vocabulary exists; padding columns get no mass and no gradient.
    loss = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), d["ids"].reshape(-1), reduction="none",
                           label_smoothing=smoothing).view(S, B)
    loss.sum().backward()
    for rank, results in enumerate(tp2):
        p_loss, p_grad = results[f"ce{smoothing}"]
        torch.testing.assert_close(p_loss, loss.detach())
        torch.testing.assert_close(p_grad, logits.grad.chunk(len(tp2), dim=-1)[rank])
    assert torch.count_nonzero(tp2[-1][f"ce{smoothing}"][1][..., VOCAB - PADDED // 2:]) == 0


def test_init_keeps_the_slice_of_the_full_weight(tp2):
    column = ColumnParallelLinear(H, FFN, init=Init("normal", 0.5))
    initialize_from_seed([("some.layer.weight", column.weight), ("some.layer.bias", column.bias)], seed=3)
    assert torch.equal(torch.cat([r["init"] for r in tp2]), column.weight.detach())
    assert column.weight.std().item() == pytest.approx(0.5, rel=0.5)


def test_cross_entropy_keeps_low_precision_logits_dtype_and_computes_in_fp32():
    d = _data()
    logits = d["logits"].bfloat16().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, d["ids"], vocab_size=VOCAB)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    expected = F.cross_entropy(logits.detach().float()[..., :VOCAB].reshape(-1, VOCAB), d["ids"].reshape(-1),
                               reduction="none").view(S, B)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("vocab_size", [VOCAB, None], ids=["padded", "unpadded"])
def test_cross_entropy_leaves_fp32_logits_untouched(vocab_size):
    """The loss works in one fp32 buffer overwritten in place; fp32 logits are the caller's, not it."""
    d = _data()
    logits = d["logits"].clone().requires_grad_()
    before = logits.detach().clone()
    vocab_parallel_cross_entropy(logits, d["ids"], vocab_size=vocab_size).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_name_seed_is_stable_and_name_dependent():
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert name_seed(1234, name) == name_seed(1234, name)
    assert name_seed(1234, name) != name_seed(1234, name.replace("layers.0", "layers.1"))
    assert name_seed(1, "w") != name_seed(2, "w") and 0 <= name_seed(1, "w") < 2**63


def test_sizes_that_do_not_split_are_refused(tp2):
    assert "output size of a column-parallel layer 7 is not divisible by the TP size 2" in \
        tp2[0]["refusal"]
