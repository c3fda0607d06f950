"""The executor waits only for data: a rank runs a pass whose inputs have arrived even while its peer
is held inside a pass that pass does not depend on.

Each case holds pipeline rank 1 inside pass X until rank 0 has started pass Y, where neither pass
depends on the other through the schedule's data flow (the simulator's dependency rules).  An
executor that paired its messages at unit-cost simulated times made rank 0 wait, before Y, for an
exchange that rank 1 reaches only after X: here that is a deadlock, which the hold turns into an
error.  The pairs were found by comparing, for every two passes, the data dependencies with the
exchanges that rule implied.
"""
import os
import time

import pytest

from megalite.parallel.pipeline.timeline import Timeline
from megalite.parallel.testing import run_on_ranks

from .harness import MICRO_BATCH, batches, forward_step, model_config

HOLD_LIMIT_S = 60.0  # a deadlock guard, not a timing: the held pass fails after this instead of hanging

# (schedule, m, v, X held on rank 1, Y on rank 0 that releases it); passes as (kind, micro-batch, chunk).
CASES = [
    ("gpipe", 4, None, ("F", 0, 0), ("F", 2, 0)),
    ("interleaved", 4, 2, ("F", 0, 1), ("F", 2, 0)),
    ("zb-h1", 4, None, ("F", 1, 0), ("F", 2, 0)),
]


class HoldingTimeline(Timeline):
    """On rank 1, pass ``held`` waits for a flag file; on rank 0, pass ``release`` creates it."""

    def __init__(self, pp_rank, flag, held, release):
        super().__init__(pp_rank)
        self.flag, self.held, self.release = flag, held, release

    def span(self, kind, microbatch, chunk=0):
        if self.pp_rank == 0 and (kind, microbatch, chunk) == self.release:
            open(self.flag, "w").close()
        if self.pp_rank == 1 and (kind, microbatch, chunk) == self.held:
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not os.path.exists(self.flag):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank 0 never started {self.release} while rank 1 held {self.held}: "
                                       f"the executor made it wait on a message it did not need")
                time.sleep(0.01)
        return super().span(kind, microbatch, chunk)


def run_held(rank, world_size, workdir):
    from megalite.model.build import build_model_chunks
    from megalite.parallel.pipeline.schedules import get_forward_backward_func
    from megalite.parallel.state import destroy_grid, initialize_grid

    finished = []
    for index, (schedule, m, virtual, held, release) in enumerate(CASES):
        config = model_config("gpt", 4)
        grid = initialize_grid(pp=world_size, virtual_pp=virtual)
        try:
            chunks = build_model_chunks(config, grid)
            timeline = HoldingTimeline(grid.pp_rank, os.path.join(workdir, f"flag-{index}"), held, release)
            get_forward_backward_func(world_size, virtual, schedule)(
                forward_step_func=forward_step, data_iterator=iter(batches(config, 0, m)), model=chunks,
                num_microbatches=m, seq_length=config.seq_length, micro_batch_size=MICRO_BATCH, grid=grid,
                timeline=timeline)
            finished.append((schedule, len(timeline.spans)))
        finally:
            destroy_grid()
    return finished


@pytest.mark.parametrize("world_size", [2])
def test_a_rank_does_not_wait_on_a_pass_it_does_not_depend_on(tmp_path, world_size):
    results = run_on_ranks(run_held, world_size, str(tmp_path), timeout=120)
    for rank_result in results:
        assert [schedule for schedule, _ in rank_result] == [case[0] for case in CASES]
        for (schedule, passes), (_, m, virtual, _, _) in zip(rank_result, CASES):
            per_microbatch = 3 if schedule == "zb-h1" else 2   # F, B (and W)
            assert passes == per_microbatch * m * (virtual or 1)
