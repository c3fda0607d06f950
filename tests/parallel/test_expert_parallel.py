"""The alltoall dispatcher's exchanges (megalite/parallel/expert_parallel.py) on two EP ranks: each row reaches
the rank that holds its expert, grouped by local expert, and comes back in place (forward and backward); the
bytes counted in ``comm_counter`` are the rows that leave the rank, forward and backward, and the count
exchange's integers for the other rank."""
import torch

from megalite.parallel.testing import run_on_ranks

HIDDEN = 5
# Rows each rank sends to each global expert (4 experts, 2 per rank): uneven, one expert without rows.
COUNTS = [[1, 2, 0, 3], [2, 2, 0, 4]]


def _rows(rank):
    """[N, HIDDEN] rows grouped by global expert; row i of expert e on rank r holds 100 r + 10 e + i."""
    values = [100 * rank + 10 * expert + i for expert, count in enumerate(COUNTS[rank]) for i in range(count)]
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, HIDDEN)


def _exchange(rank, world_size):
    from megalite.parallel import expert_parallel, state
    from megalite.parallel.mappings import comm_counter
    grid = state.initialize_grid(ep=2, moe=True)
    comm_counter.reset()
    rows = _rows(rank).requires_grad_()
    received, local_counts, plan = expert_parallel.dispatch(rows, torch.tensor(COUNTS[rank]), grid.ep_group)
    back = expert_parallel.combine(received * 2, plan, grid.ep_group)
    back.backward(torch.ones_like(back))
    result = (received.detach()[:, 0].tolist(), local_counts.tolist(), back.detach(), rows.grad,
              dict(comm_counter.bytes), dict(comm_counter.calls))
    state.destroy_grid()
    return result


def test_alltoall_dispatch_delivers_returns_and_counts_the_bytes_sent():
    results = run_on_ranks(_exchange, 2)
    for rank, (received, local_counts, back, grad, sent, calls) in enumerate(results):
        mine = [2 * rank, 2 * rank + 1]                     # this rank's global experts
        expected = [100 * source + 10 * expert + i for expert in mine for source in (0, 1)
                    for i in range(COUNTS[source][expert])]
        assert received == expected                         # grouped by local expert, then by source rank
        assert local_counts == [COUNTS[0][e] + COUNTS[1][e] for e in mine]
        torch.testing.assert_close(back, 2 * _rows(rank))
        torch.testing.assert_close(grad, torch.full_like(grad, 2.0))
        other = 1 - rank
        out = sum(COUNTS[rank][2 * other:2 * other + 2])                # rows this rank sends to the other
        came = sum(COUNTS[other][2 * rank:2 * rank + 2])                # rows it receives from the other
        # dispatch sends ``out`` and combine returns ``came``; backward sends the same rows the other way
        assert sent["ep_all_to_all"] == 2 * (out + came) * HIDDEN * 4
        assert calls["ep_all_to_all"] == 4
        assert sent["ep_all_to_all_counts"] == 2 * 8 and calls["ep_all_to_all_counts"] == 1   # 2 int64 counts
