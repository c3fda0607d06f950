"""Each TP mapping's forward and backward on 2 ranks, against results computed by hand.

Rank r's inputs and upstream gradients are written out below so the expected values can be
checked with pencil and paper; all pairs run in one forked call.
"""
import pytest
import torch

from megalite.parallel import mappings, state
from megalite.parallel.testing import run_on_ranks

A = torch.arange(8.0)        # 0..7


# pair: (forward input on rank r, upstream grad on rank r, expected output on rank r,
#        expected input grad on rank r, bytes each rank sends in fwd + bwd at t=2)
def _cases(r):
    ones = torch.ones(2, 2)
    return {
        # identity forward; backward sums the ranks' grads: 1 + 2 = 3
        "copy_to_tp": (A.view(2, 4), (r + 1) * torch.ones(2, 4), A.view(2, 4), 3 * torch.ones(2, 4), 32),
        # forward sums (1 + 2) * A; backward passes the grad through
        "reduce_from_tp": ((r + 1) * A.view(2, 4), A.view(2, 4) + r, 3 * A.view(2, 4), A.view(2, 4) + r, 32),
        # forward keeps columns [2r, 2r+2); backward places each rank's grad in its columns
        "scatter_to_tp": (A.view(2, 4), (r + 1) * ones, A.view(2, 4)[:, 2 * r:2 * r + 2],
                          torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]), 16),
        # forward concatenates columns; backward keeps this rank's columns of the grad
        "gather_from_tp": ((r + 1) * ones, A.view(2, 4), torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]),
                           A.view(2, 4)[:, 2 * r:2 * r + 2], 16),
        # forward keeps rows (tokens) [2r, 2r+2); backward stacks the ranks' grads
        "scatter_to_sp": (A.view(4, 2), (r + 1) * ones, A.view(4, 2)[2 * r:2 * r + 2],
                          torch.tensor([[1.0, 1], [1, 1], [2, 2], [2, 2]]), 16),
        # forward stacks the rows; backward (replicated consumer) keeps this rank's rows
        "gather_from_sp": ((r + 1) * ones, A.view(4, 2), torch.tensor([[1.0, 1], [1, 1], [2, 2], [2, 2]]),
                           A.view(4, 2)[2 * r:2 * r + 2], 16),
        # forward stacks the rows; backward (TP-split consumer, grads (r+1) A) sums and keeps this rank's rows
        "all_gather_from_sp": ((r + 1) * ones, (r + 1) * A.view(4, 2),
                               torch.tensor([[1.0, 1], [1, 1], [2, 2], [2, 2]]), 3 * A.view(4, 2)[2 * r:2 * r + 2],
                               32),
        # forward sums (1 + 2) A and keeps this rank's rows; backward stacks the ranks' grads
        "reduce_scatter_to_sp": ((r + 1) * A.view(4, 2), (r + 1) * ones, 3 * A.view(4, 2)[2 * r:2 * r + 2],
                                 torch.tensor([[1.0, 1], [1, 1], [2, 2], [2, 2]]), 32),
    }


def _run_all(rank, world_size):
    state.initialize_grid(tp=world_size)
    results = {}
    for name, (x, grad, _, _, _) in _cases(rank).items():
        mappings.comm_counter.reset()
        x = x.clone().requires_grad_()
        y = getattr(mappings, name)(x)
        y.backward(grad)
        results[name] = (y.detach(), x.grad, mappings.comm_counter.total_bytes)
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_run_all, 2)


@pytest.mark.parametrize("name", list(_cases(0)))
def test_forward_and_backward_match_hand_computed(results, name):
    for rank, rank_results in enumerate(results):
        _, _, expected_out, expected_grad, expected_bytes = _cases(rank)[name]
        out, grad, sent = rank_results[name]
        assert torch.equal(out, expected_out), (rank, out)
        assert torch.equal(grad, expected_grad), (rank, grad)
        # Ring model at t=2: all-reduce of N bytes sends N, all-gather / reduce-scatter N/2
        # (N = the full tensor: 8 floats = 32 bytes).
        assert sent == expected_bytes, (rank, sent)


@pytest.mark.parametrize("name", list(_cases(0)))
def test_every_mapping_is_the_identity_without_a_grid(name):
    x = torch.randn(4, 4, requires_grad=True)
    y = getattr(mappings, name)(x)
    y.backward(torch.ones(4, 4))
    assert torch.equal(y, x) and torch.equal(x.grad, torch.ones(4, 4))


def test_counter_ring_model():
    counter = mappings.CommCounter()
    counter.add("all_reduce", 1000, 4)
    counter.add("all_gather", 1000, 4)
    counter.add("reduce_scatter", 1000, 4)
    assert dict(counter.bytes) == {"all_reduce": 1500, "all_gather": 750, "reduce_scatter": 750}
    assert counter.total_bytes == 3000
    assert dict(counter.calls) == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}
