"""megalite/model/compile.py: --compile trains as eager does.

The backend is aot_eager: it traces each layer into a graph, differentiates it ahead of time and
runs that graph, so tracing, graph breaks, recompute of a compiled layer and the norms' switch to
their reference are all exercised, without the minutes inductor's C++ code generation takes on a
2-core CPU.  Dropout is off but in one case: inductor draws its own random numbers, aot_eager runs
torch's dropout in eager's order, so with it the losses still match; the switches of RNG stream
around dropout then split each layer into a few graphs.
"""
import math

import pytest
import torch

from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import COMPILE_WITH_RECOMPUTE_FROM, parse_args

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1000", "--seed", "7", "--train-iters", "3", "--lr", "3e-3",
        "--hidden-dropout", "0", "--attention-dropout", "0"]
LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]   # later flags win


def _losses_and_compiled_layers(rank, world_size, argv):
    import torch

    from megalite.model import compile as compile_module
    from megalite.training import loop as training

    compiled = []

    def counting(chunk, backend):
        compiled.append((compile_module.compile_layers(chunk, backend), backend))
        return compiled[-1][0]
    training.compile_layers = counting
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    history = training.pretrain(argv)
    counters = torch._dynamo.utils.counters
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return [r["loss"] for r in history], compiled, (graphs, breaks)


PACKED = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
CP2 = ["--context-parallel-size", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("model,world", [(LLAMA + PACKED, 1), (LLAMA + CP2, 2), (LLAMA + CP2 + PACKED, 2)],
                         ids=["packed", "cp2", "cp2-packed"])
def test_compiled_layers_with_split_attention_train_like_eager(model, world):
    """Attention across CP ranks or documents runs eagerly inside the compiled layer (a graph break on
    each side of it), and the run trains as eager does."""
    eager = run_on_ranks(_losses_and_compiled_layers, world, TINY + model, timeout=120)[0][0]
    compiled, layers, (graphs, breaks) = run_on_ranks(
        _losses_and_compiled_layers, world, TINY + model + ["--compile", "--compile-backend", "aot_eager"],
        timeout=240)[0]
    assert layers == [(2, "aot_eager")] and graphs >= 2 and breaks >= 1
    # Measured: 12 graphs (the part before and after attention, per layer, reused across micro-batches);
    # with the compiler tracing the block planning it recompiles for each document layout: 25.
    assert graphs <= 16, graphs
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


@pytest.mark.slow   # 10-30 s each on a shared 2-core CPU: tracing and ahead-of-time autograd
@pytest.mark.parametrize("model", [[], LLAMA, LLAMA + RECOMPUTE, DROPOUT],
                         ids=["gpt", "llama", "llama-recompute", "gpt-dropout"])
def test_compiled_layers_train_like_eager(model):
    if model == LLAMA + RECOMPUTE and torch.__version__ < COMPILE_WITH_RECOMPUTE_FROM:
        pytest.skip(f"--compile with recompute is refused on torch {torch.__version__} (arguments.py)")
    eager, none_compiled, (no_graphs, _) = run_on_ranks(_losses_and_compiled_layers, 1, TINY + model, timeout=120)[0]
    compiled, layers, (graphs, breaks) = run_on_ranks(_losses_and_compiled_layers, 1,
                                            TINY + model + ["--compile", "--compile-backend", "aot_eager"],
                                            timeout=240)[0]
    assert none_compiled == [] and no_graphs == 0
    assert layers == [(2, "aot_eager")] and graphs >= 1   # the layers were traced, not run eagerly
    if model != DROPOUT:   # one graph per layer: nothing in a layer (RNG streams, the norms) splits it
        assert breaks == 0
    assert len(eager) == 3 and all(math.isfinite(x) for x in eager)
    # The same float32 operations, regrouped by the traced graph: round-off of ~1e-7 per op, grown
    # over three optimizer steps of a 2-layer model, stays far below 1e-5.
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_compile_keeps_parameter_names():
    """Checkpoints depend on the names: compiling in place must not add a wrapper prefix."""
    from megalite.config.settings import ModelConfig
    from megalite.model.compile import compile_layers
    from megalite.model.transformer import TransformerBlock

    block = TransformerBlock(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4), 2)
    names = [name for name, _ in block.named_parameters()]
    assert compile_layers(block, "aot_eager") == 2
    assert [name for name, _ in block.named_parameters()] == names


def test_compile_with_recompute_is_refused_on_a_torch_it_fails_on(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ValueError, match=r"--compile with --recompute-granularity full .* this is torch 2.4.1"):
        parse_args(TINY + RECOMPUTE + ["--compile"], world_size=1)
    parse_args(TINY + ["--compile"], world_size=1)     # without recompute it is fine there
