"""Expert tensor parallelism's exchange (megalite/parallel/expert_parallel.py) on 2 gloo ranks with unequal row
counts (and with one rank sending none): every rank receives both ranks' rows grouped by local expert, and the
partial outputs return summed to the rank that sent each row; the input gradient is the sum of both ranks'
partial ones."""
import pytest
import torch

from megalite.parallel.testing import run_on_ranks

HIDDEN = 3


def _rows(rank, counts):
    values = torch.arange(sum(counts[rank]) * HIDDEN, dtype=torch.float32).view(-1, HIDDEN) + 100 * rank
    return values, torch.tensor(counts[rank])


def _exchange(rank, world_size, counts):
    import torch.distributed as dist

    from megalite.parallel.expert_parallel import gather_for_expert_tp, reduce_scatter_from_expert_tp
    from megalite.parallel.mappings import comm_counter
    group = dist.group.WORLD
    comm_counter.reset()
    rows, local_counts = _rows(rank, counts)
    rows.requires_grad_(True)
    gathered, gathered_counts, plan = gather_for_expert_tp(rows, local_counts, group)
    scale = float(rank + 2)                        # each rank's partial output: its own multiple of the rows
    out = reduce_scatter_from_expert_tp(gathered * scale, plan, group)
    out.backward(torch.ones_like(out))
    counted = {kind: comm_counter.bytes[kind] for kind in ("etp_all_to_all", "ep_all_to_all")}
    return gathered.detach(), gathered_counts.tolist(), out.detach(), rows.grad, counted


@pytest.mark.parametrize("counts", [[[2, 0, 3], [1, 0, 2]], [[2, 0, 3], [0, 0, 0]]],
                         ids=["unequal", "one rank sends none"])
def test_expert_tp_gathers_rows_by_local_expert_and_sums_the_partials_back(counts):
    results = run_on_ranks(_exchange, 2, counts)
    blocks = [_rows(r, counts)[0].split(counts[r]) for r in range(2)]
    expected = torch.cat([block for e in range(3) for block in (blocks[0][e], blocks[1][e])])
    for rank, (gathered, gathered_counts, out, grad, counted) in enumerate(results):
        assert torch.equal(gathered, expected)       # by local expert, each expert's rows by source rank
        assert gathered_counts == [a + b for a, b in zip(*counts)]
        rows = _rows(rank, counts)[0]
        assert torch.equal(out, rows * (2 + 3))       # both ranks' partials of this rank's rows, summed
        assert torch.equal(grad, torch.full_like(rows, 2 + 3))
        # counted as expert TP's, not EP's: forward, this rank's rows to the other rank and the other rank's
        # partials of them back; backward, the same two again (4 bytes an element)
        other = sum(counts[1 - rank])
        mine = sum(counts[rank])
        assert counted == {"etp_all_to_all": 2 * (mine + other) * HIDDEN * 4, "ep_all_to_all": 0}, counted
