"""csrc/cuda/chunk_plan.h -- how CUDA Adam's multi-tensor apply cuts a parameter group into launches --
compiled with the host compiler and checked on the CPU.

A launch's argument holds at most 24 tensors and 320 blocks of 65536 elements.  The walk must hand
every chunk of every non-empty tensor to exactly one block, every block a tensor slot filled in its
own launch (a stale slot is another tensor's memory), and cut a launch only at a limit; a tensor
whose chunks cross the block limit continues in slot 0 of the next launch.  The CUDA tests
(test_cuda_blind_spots.py) run these cuts on a GPU; here the same lists, and thousands of random ones
under small limits that are hit all the time, run without one."""
import random
import subprocess

import pytest

from tests.ops.host_driver import build

CHUNK, MAX_TENSORS, MAX_BLOCKS = 65536, 24, 320   # what tests/ops/test_cuda_blind_spots.py assumes


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build("chunk_plan_driver.cpp", tmp_path_factory.mktemp("chunk_plan"))


def plan(binary, cases):
    """cases: [(chunk, max_tensors, max_blocks, numels)] -> (Adam's limits, [launches per case]); a
    launch is (slots: {slot: tensor}, blocks: [(slot, chunk, tensor)])."""
    text = "".join(f"{c} {t} {b} {' '.join(map(str, numels))}\n" for c, t, b, numels in cases)
    lines = subprocess.run([str(binary)], input=text, check=True, capture_output=True, text=True).stdout.splitlines()
    adam = tuple(int(f) for f in lines[0].split()[1:])
    plans, slots, blocks = [], {}, []
    for kind, *fields in (line.split() for line in lines[1:]):
        values = [int(f) for f in fields]
        if kind == "list":
            plans.append([])
        elif kind == "slot":
            slots[values[0]] = values[1]
        elif kind == "block":
            assert values[0] == len(blocks), "blocks are numbered 0, 1, ... within a launch"
            assert values[1] in slots, f"block {values[0]} reads slot {values[1]}, not filled in this launch"
            blocks.append((values[1], values[2], slots[values[1]]))   # (slot, chunk, tensor)
        else:
            assert values[0] == len(blocks)
            plans[-1].append((dict(slots), blocks))
            slots, blocks = {}, []
    assert not blocks, "blocks left without a launch"
    return adam, plans


def check(launches, chunk, max_tensors, max_blocks, numels):
    """Every chunk once, the limits kept, a launch cut only at a limit (or at the end)."""
    seen = []
    for index, (slots, blocks) in enumerate(launches):
        assert 1 <= len(blocks) <= max_blocks and 1 <= len(slots) <= max_tensors
        assert sorted(slots) == list(range(len(slots))), "slots fill from 0"
        for slot, c, tensor in blocks:
            assert 0 <= c < -(-numels[tensor] // chunk), (tensor, c)
            seen.append((tensor, c))
        if index < len(launches) - 1:
            assert len(blocks) == max_blocks or len(slots) == max_tensors, f"launch {index} cut below both limits"
    wanted = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    assert sorted(seen) == wanted, "each chunk of each non-empty tensor exactly once"


def test_the_driver_checks_adams_own_limits(driver):
    adam, _ = plan(driver, [])
    assert adam == (CHUNK, MAX_TENSORS, MAX_BLOCKS)


ADAM_CASES = {   # the size lists of the CUDA tests, with the launches they must give
    "one-tensor": ([2 * MAX_BLOCKS * CHUNK + 7], [MAX_BLOCKS, MAX_BLOCKS, 1]),
    "exact-limit": ([MAX_BLOCKS * CHUNK, 5, 3], [MAX_BLOCKS, 2]),
    "24th-crosses": ([CHUNK + 1] * 23 + [300 * CHUNK + 9], [MAX_BLOCKS, 23 * 2 + 301 - MAX_BLOCKS]),
    "both-limits": ([1] * 23 + [3 * CHUNK, 2, 330 * CHUNK], [26, MAX_BLOCKS, 11]),
    "30-tensors": ([1, 7, CHUNK * 11 + 5, 0] + [CHUNK * 13 + 3] * 26, None),
}


@pytest.mark.parametrize("name", sorted(ADAM_CASES))
def test_adam_cuts_at_the_limits(driver, name):
    numels, launch_blocks = ADAM_CASES[name]
    _, (launches,) = plan(driver, [(CHUNK, MAX_TENSORS, MAX_BLOCKS, numels)])
    check(launches, CHUNK, MAX_TENSORS, MAX_BLOCKS, numels)
    if launch_blocks is not None:
        assert [len(blocks) for _, blocks in launches] == launch_blocks
    for (slots, blocks), (next_slots, next_blocks) in zip(launches, launches[1:]):
        last_tensor, last_chunk = blocks[-1][2], blocks[-1][1]
        if last_chunk + 1 < -(-numels[last_tensor] // CHUNK):   # cut inside a tensor: carried over
            assert next_slots[0] == last_tensor and next_blocks[0][:2] == (0, last_chunk + 1)


def test_random_lists_under_small_limits(driver):
    """3,000 lists of 0-40 tensors (empty ones among them) under limits of 1-5 tensors and 1-7 blocks
    of 1-4 elements: carry-overs, exact fits and both limits at once, many times over."""
    rng = random.Random(0)
    cases = []
    for _ in range(3000):
        chunk = rng.randint(1, 4)
        numels = [rng.choice([0, rng.randint(1, 3 * chunk), rng.randint(1, 30)]) for _ in range(rng.randint(0, 40))]
        cases.append((chunk, rng.randint(1, 5), rng.randint(1, 7), numels))
    _, plans = plan(driver, cases)
    assert len(plans) == len(cases)
    for (chunk, max_tensors, max_blocks, numels), launches in zip(cases, plans):
        if not any(numels):
            assert launches == []
        else:
            check(launches, chunk, max_tensors, max_blocks, numels)
