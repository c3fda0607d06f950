"""Pipelined training of GPTModel equals one-rank training: loss per step and parameters after 5 steps.

The matrix: PP {2, 4} x schedule {GPipe, 1F1B, interleaved v=2, ZB-H1} x micro-batches
{PP, PP+1, 2 PP} (the odd PP+1 is refused by interleaved; see test_simulator) for a GPT model (tied
embedding), and PP {2, 4} x every schedule at 2 PP micro-batches for a LLaMA-style one (RMSNorm,
SwiGLU, rotary, GQA, untied output).  The model has 2 layers per pipeline rank (1 per virtual
chunk); the reference trains the same layers on one rank with the same micro-batches.  Each pipeline
size runs its whole matrix inside one forked call; the optimizer is the real one (harness.py).

Tolerances, observed on every case:
- LLaMA (untied): bit-identical.  Every rank runs the same ops on the same shapes as the one-rank
  model, in the same order, and messages carry exact bits, so nothing re-associates.
- GPT (tied): the word embedding's gradient is (sum of micro-batches' input-embedding grads) +
  (sum of their output-layer grads) when the two live on different stages, but the sum over
  micro-batches of (output + embedding) on one rank; the re-association changes it by ~1 ulp at
  step 1, then everything differs by ulps.  Adam divides by sqrt(v), which amplifies round-off where
  the exact gradient is zero: the key bias (softmax is invariant to adding q.b_k to every score of a
  query) drifts up to 1.1e-5 in 5 steps at lr 1e-2; every other parameter stays within 7e-7 and the
  losses within one ulp (4.8e-7).  Hence 5e-5 on parameters and 2e-6 on losses.  Real faults are
  far outside: without the embedding-group sum parameters move by 8e-2 and losses by 1e-2; counting
  the tied embedding twice in the clipping norm, 9e-3 and 7e-4.
"""
import contextlib
import functools

import pytest
import torch

from megalite.parallel.pipeline.orders import SCHEDULES, build_order
from megalite.parallel.pipeline.schedules import forward_backward_no_pipelining, get_forward_backward_func
from megalite.parallel.pipeline.simulator import peak_in_flight
from megalite.parallel.testing import run_on_ranks

from .harness import VARIANTS, run_layouts

# (loss, parameters) absolute tolerance; see the module docstring.
TOLERANCE = {"gpt": (2e-6, 5e-5), "llama": (0.0, 0.0)}


def layers(p):
    return 2 * p


def matrix(p):
    """[(variant, schedule, micro-batches, virtual size)] run at PP = p: GPT over every micro-batch
    count, LLaMA at 2 PP only (it changes the model, not the schedule; ~1 s per case on 2 cores)."""
    cases = []
    for schedule in SCHEDULES:
        virtual = 2 if schedule == "interleaved" else None
        for m in (p, p + 1, 2 * p):
            if schedule == "interleaved" and m % p:
                continue  # refused with a message; see test_simulator
            cases.append(("gpt", schedule, m, virtual))
        cases.append(("llama", schedule, 2 * p, virtual))
    return cases


@functools.lru_cache(maxsize=None)
def pipelined(p):
    """Per case of matrix(p): the per-rank results of harness.train."""
    layouts = [(variant, layers(p), schedule, m, v) for variant, schedule, m, v in matrix(p)]
    per_rank = run_on_ranks(run_layouts, p, layouts, timeout=300)
    return [[rank_results[i] for rank_results in per_rank] for i in range(len(layouts))]


@functools.lru_cache(maxsize=None)
def reference():
    """{(variant, num_layers, micro-batches): one-rank result}, all in one forked call."""
    keys = sorted({(variant, layers(p), m) for p in (2, 4) for variant, _, m, _ in matrix(p)})
    results = run_on_ranks(run_layouts, 1, [(variant, n, None, m, None) for variant, n, m in keys], timeout=300)[0]
    return dict(zip(keys, results))


def assert_same_training(per_rank, ref, variant):
    """Losses of every step (last stage) and parameters after training, against the one-rank run."""
    ref_losses, ref_params, _ = ref
    loss_tol, param_tol = TOLERANCE[variant]
    assert per_rank[-1][0] == pytest.approx(ref_losses, abs=loss_tol, rel=0)
    assert all(losses == [None] * len(ref_losses) for losses, _, _ in per_rank[:-1])
    named = {}
    for _, params, _ in per_rank:
        assert not set(named) & set(params)  # every layer on exactly one rank
        named.update(params)
    tied = not VARIANTS[variant].get("untie_embeddings_and_output_weights", False)
    # With a tied embedding the one-rank model has one word-embedding parameter; the pipeline two.
    assert set(named) == set(ref_params) | ({"output_layer.weight"} if tied else set())
    for name, expected in ref_params.items():
        torch.testing.assert_close(named[name], expected, atol=param_tol, rtol=0, msg=lambda m: f"{name}: {m}")
    if tied:
        # Both copies got the same summed gradient and the same Adam update: identical bits.
        first = [params for _, params, _ in per_rank if "embedding.word_embeddings.weight" in params][0]
        last = per_rank[-1][1]
        torch.testing.assert_close(last["output_layer.weight"], first["embedding.word_embeddings.weight"],
                                   atol=0, rtol=0)


CASES = [(p, *case) for p in (2, 4) for case in matrix(p)]


@pytest.mark.parametrize("p,variant,schedule,m,virtual", CASES,
                         ids=[f"{c[1]}-pp{c[0]}-{c[2]}-m{c[3]}" for c in CASES])
def test_pipeline_matches_one_rank(p, variant, schedule, m, virtual):
    per_rank = pipelined(p)[matrix(p).index((variant, schedule, m, virtual))]
    assert_same_training(per_rank, reference()[(variant, layers(p), m)], variant)
    # Memory: what autograd really kept alive peaks where the simulator says.
    assert [peak for _, _, peak in per_rank] == peak_in_flight(build_order(schedule, p, m, virtual))


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
    with pytest.raises(ValueError, match="needs a pipeline size > 1"):
        get_forward_backward_func(1, 2)
    with pytest.raises(ValueError, match="use the interleaved schedule"):
        get_forward_backward_func(4, 2, "1f1b")
    with pytest.raises(ValueError, match="not one of"):
        get_forward_backward_func(4, None, "pipedream")
