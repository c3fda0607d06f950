"""Pipelined training equals one-rank training: loss per step and parameters after 5 steps.

Each pipeline size runs its whole matrix of (schedule, micro-batches) inside one forked call.
Tolerance 1e-5: the layouts sum the same micro-batch gradients in the same order, but the
pipelined stage boundaries change nothing except float32 re-association in the loss mean, so
results agree to a few ulps (observed <= 6e-8)."""
import contextlib
import functools

import pytest
import torch

from megalite.parallel.pipeline.orders import build_order
from megalite.parallel.pipeline.schedules import forward_backward_no_pipelining, get_forward_backward_func
from megalite.parallel.pipeline.simulator import peak_in_flight
from megalite.testing import run_on_ranks

from .harness import run_layouts
from .toy_model import ToyConfig, ToyModel

CONFIG = ToyConfig()
TOL = 1e-5


def matrix(p):
    layouts = []
    for schedule in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        for m in (p, 2 * p, p + 1):
            if schedule == "interleaved" and m % p:
                continue  # refused with a message; see test_simulator
            layouts.append((schedule, m, 2 if schedule == "interleaved" else None))
    return layouts


@functools.lru_cache(maxsize=None)
def pipelined(p):
    return run_on_ranks(run_layouts, p, CONFIG, ToyModel, matrix(p), timeout=240)


@functools.lru_cache(maxsize=None)
def reference():
    ms = sorted({m for p in (2, 4) for _, m, _ in matrix(p)})
    results = run_on_ranks(run_layouts, 1, CONFIG, ToyModel, [(None, m, None) for m in ms])[0]
    return dict(zip(ms, results))


CASES = [(p, schedule, m, v) for p in (2, 4) for schedule, m, v in matrix(p)]


@pytest.mark.parametrize("p,schedule,m,virtual", CASES, ids=[f"pp{c[0]}-{c[1]}-m{c[2]}" for c in CASES])
def test_pipeline_matches_one_rank(p, schedule, m, virtual):
    index = matrix(p).index((schedule, m, virtual))
    per_rank = [rank_results[index] for rank_results in pipelined(p)]
    ref_losses, ref_params, _ = reference()[m]
    losses = per_rank[-1][0]
    assert losses == pytest.approx(ref_losses, abs=TOL)
    assert all(r[0] == [None] * len(ref_losses) for r in per_rank[:-1])
    named = {}
    for _, params, _ in per_rank:
        named.update(params)
    assert set(named) == set(ref_params) | {"output.weight"}
    for name, ref in ref_params.items():
        torch.testing.assert_close(named[name], ref, atol=TOL, rtol=0, msg=name)
    # Tied embedding: first stage's input embedding and last stage's output layer stay one weight.
    torch.testing.assert_close(named["output.weight"], named["embedding.weight"], atol=TOL, rtol=0)
    # Memory: what autograd really kept alive peaks where the simulator says.
    order = build_order(schedule, p, m, virtual)
    assert [r[2] for r in per_rank] == peak_in_flight(order)


def test_no_pipelining_accumulates_mean_gradient_and_syncs_once():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [torch.randn(3, 4) for _ in range(4)]
    synced = []

    @contextlib.contextmanager
    def no_sync():
        synced.append(False)
        yield

    def forward_step(it, chunk):
        out = chunk(next(it))
        return out, lambda o: (o.pow(2).mean(), {"lm loss": o.pow(2).mean().detach()})

    losses = forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=iter(data), model=[model],
                                            num_microbatches=4, seq_length=3, micro_batch_size=1, no_sync_func=no_sync)
    grad = model.weight.grad.clone()
    model.zero_grad()
    torch.stack([model(x).pow(2).mean() for x in data]).mean().backward()
    torch.testing.assert_close(grad, model.weight.grad)
    assert len(losses) == 4 and len(synced) == 3  # every micro-batch but the last inside no_sync


def test_get_forward_backward_func_choices_and_errors():
    assert get_forward_backward_func(1, None) is forward_backward_no_pipelining
    assert get_forward_backward_func(4, None).__name__ == "forward_backward_1f1b"
    assert get_forward_backward_func(4, 2).__name__ == "forward_backward_interleaved"
    assert get_forward_backward_func(4, None, "zb-h1").__name__ == "forward_backward_zb_h1"
    with pytest.raises(ValueError, match="needs --pipeline-model-parallel-size > 1"):
        get_forward_backward_func(1, 2)
    with pytest.raises(ValueError, match="use --pipeline-schedule interleaved"):
        get_forward_backward_func(4, 2, "1f1b")
    with pytest.raises(ValueError, match="not one of"):
        get_forward_backward_func(4, None, "pipedream")
