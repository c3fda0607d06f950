"""Parity: a TP / SP / recompute layout trains exactly like the one-process model (docs/architecture.md, "Parity").

The matrix: variant {GPT, LLaMA-with-GQA} x TP {1, 2, 4} x sequence parallelism {off, on} x recompute
{none, selective, full-uniform, full-block}, dropout off: the full product at TP 2 and 4 (32 cases);
TP=1 runs (no process grid) cover SP and recompute in the test process.

One forked 4-rank call runs all multi-rank cases; at TP=2 the two data-parallel replicas train two
different cases at once.  Each case reports, against the one-process reference trained in the test
process: every loss of 10 AdamW steps, every gradient of step 1 gathered back to full shape, and
every parameter after the 10 steps.  Vocabulary sizes 101 and 100 do not divide TP (tp_harness.py).
"""
import pytest
import torch

from megalite.model.gpt import GPTModel
from megalite.model.loss import language_model_loss
from megalite.parallel import state
from megalite.parallel.grads import allreduce_sequence_parallel_grads
from megalite.parallel.testing import run_on_ranks
from tests.parallel.tp_harness import VARIANTS, batch, full_state, model_config

STEPS = 10
LR = 3e-3
# (variant, TP, sequence parallel, recompute)
RECOMPUTE = ("none", "selective", "full-uniform", "full-block")
MULTI_RANK_CASES = [(variant, tp, sp, recompute) for variant in VARIANTS for tp in (2, 4)
                    for sp in (False, True) for recompute in RECOMPUTE]
ONE_RANK_CASES = [(variant, 1, sp, recompute) for variant in VARIANTS
                  for sp, recompute in ((True, "none"), (False, "selective"), (True, "full-uniform"),
                                        (False, "full-block"))]


def train(config, sequence_parallel=False):
    """(losses of STEPS AdamW steps, full-shape grads of step 1, full-shape params after the steps)."""
    model = GPTModel(config, sequence_parallel=sequence_parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    tokens, positions, labels = batch(config)
    mask = torch.ones_like(labels, dtype=torch.float32)
    losses, first_grads = [], None
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = language_model_loss(model(tokens, positions, labels=labels), mask).loss
        loss.backward()
        if state.grid_is_initialized():
            # The SP part of finalize_model_grads (its DP average would mix the two cases of a TP=2 round).
            allreduce_sequence_parallel_grads([model], state.get_grid())
        if step == 0:
            first_grads = full_state(model, config.vocab_size, grads=True)
        losses.append(loss.item())
        optimizer.step()
    return losses, first_grads, full_state(model, config.vocab_size)


def _run_multi_rank(rank, world_size, cases):
    results = {}
    for tp in (2, 4):
        grid = state.initialize_grid(tp=tp)
        mine = [case for case in cases if case[1] == tp][grid.dp_rank::grid.dp_size]   # DP replicas split the cases
        for case in mine:
            run = train(model_config(case[0], case[3]), sequence_parallel=case[2])
            if grid.tp_rank == 0:
                results[case] = run
        state.destroy_grid()
    return results


@pytest.fixture(scope="module")
def runs():
    # The references run here, before the fork: the children inherit a warmed-up torch.
    references = {variant: train(model_config(variant)) for variant in VARIANTS}
    runs = {case: train(model_config(case[0], case[3]), sequence_parallel=case[2]) for case in ONE_RANK_CASES}
    for rank_runs in run_on_ranks(_run_multi_rank, 4, MULTI_RANK_CASES, timeout=240):
        runs.update(rank_runs)
    return references, runs


def assert_same_training(run, reference):
    losses, grads, params = run
    ref_losses, ref_grads, ref_params = reference
    assert grads.keys() == ref_grads.keys() == params.keys(), sorted(set(grads) ^ set(ref_grads))
    # Float32 round-off: TP reorders the sums inside each matmul (partial sums over h/t, then an
    # all-reduce) and SP the sums of norm-weight grads, ~1e-7 relative per op, a few ops deep.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name
    # Parameters are O(0.02..1).  One element class moves on round-off alone: the key bias, whose
    # true gradient is exactly 0 (softmax ignores a per-query shift of all scores); its computed
    # grad is ~1e-11 noise, and Adam turns that into steps of lr*|g|/(|g|+eps) ~ 2e-3*lr each,
    # ~6e-5 after 10 steps -- hence 1e-4 absolute, still 30x below one lr step.
    for name, param in params.items():
        assert (param - ref_params[name]).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("case", MULTI_RANK_CASES + ONE_RANK_CASES,
                         ids=lambda c: f"{c[0]}-tp{c[1]}-{'sp' if c[2] else 'nosp'}-{c[3]}")
def test_layout_trains_like_one_process(runs, case):
    references, case_runs = runs
    assert_same_training(case_runs[case], references[case[0]])

