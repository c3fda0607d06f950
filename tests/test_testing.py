"""The rank harness (megalite/parallel/testing.py) on both ways of starting ranks: results in rank order, a
rank's traceback on failure, hung ranks named, the caller's environment reaching every rank."""
import os

import pytest
import torch
import torch.distributed as dist

from megalite.parallel.testing import START_ENV, RankFailed, RanksHung, rank_start_method, run_on_ranks

START_METHODS = ["fork", "forkserver"]


@pytest.fixture(params=START_METHODS)
def start_method(request, monkeypatch):
    monkeypatch.setenv(START_ENV, request.param)
    return request.param


def _sum_of_ranks(rank, world_size, scale):
    t = torch.ones(1) * rank * scale
    dist.all_reduce(t)
    return t.item(), os.getpid(), os.environ.get("MEGALITE_TEST_MARK")


def test_ranks_return_in_rank_order(start_method, monkeypatch):
    monkeypatch.setenv("MEGALITE_TEST_MARK", "set-by-the-test")  # after the fork server started, too
    results = run_on_ranks(_sum_of_ranks, 3, 2.0)
    assert [value for value, _, _ in results] == [6.0] * 3
    assert len({pid for _, pid, _ in results} | {os.getpid()}) == 4  # three processes, none of them pytest
    assert [mark for _, _, mark in results] == ["set-by-the-test"] * 3


def _backward_then_report(rank, world_size):
    # What the fork server exists for: a rank's first backward works whatever its caller did.
    x = torch.ones(3, requires_grad=True)
    (x * x).sum().backward()
    return x.grad.tolist(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_ranks_run_backward_after_the_caller_did(start_method, request):
    if start_method == "fork" and torch.cuda.is_available():
        # The reason the fork server exists: strict, so that a torch which stops poisoning forks
        # after a backward shows up here (and MEGALITE_RANK_START=auto could fork again).
        request.applymarker(pytest.mark.xfail(raises=RankFailed, strict=True,
                                              reason="autograd's device threads make forks unusable"))
    x = torch.ones(2, requires_grad=True)
    x.sum().backward()  # on a machine with a GPU this starts autograd's device threads here
    results = run_on_ranks(_backward_then_report, 2)
    assert [grad for grad, _ in results] == [[2.0, 2.0, 2.0]] * 2
    if start_method == "forkserver":
        assert [hidden for _, hidden in results] == ["", ""]  # ranks are CPU ranks on any machine


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ArithmeticError("rank one's own failure")
    return rank


def test_a_failing_rank_fails_with_its_traceback(start_method):
    # Not "1 of 2": rank 0 may or may not have finished when the harness stops waiting, and gloo may
    # make it fail too once rank 1 has gone (seen in a full suite on a loaded machine).
    with pytest.raises(RankFailed, match=r"(?s)of 2 ranks failed.*rank 1 raised.*ArithmeticError: rank one's own"):
        run_on_ranks(_raise_on_rank_one, 2)


def _sleep_on_rank_zero(rank, world_size):
    import time
    if rank == 0:
        time.sleep(60)


def test_a_hung_rank_is_killed_and_named(start_method):
    # 4 s: time enough for rank 1 to finish on a loaded 2-core machine, so that only rank 0 is named.
    with pytest.raises(RanksHung, match=r"rank\(s\) \[0\] of 2 did not finish within 4 s \(finished: \[1\]\)"):
        run_on_ranks(_sleep_on_rank_zero, 2, timeout=4)


def test_the_fork_server_refuses_a_local_function_by_name(monkeypatch):
    monkeypatch.setenv(START_ENV, "forkserver")

    def local(rank, world_size):
        return rank
    with pytest.raises(TypeError, match="local.*cannot be pickled.*define the function at module level"):
        run_on_ranks(local, 1)


def test_start_method_choice(monkeypatch):
    monkeypatch.setenv(START_ENV, "spawn")
    with pytest.raises(ValueError, match=f"{START_ENV}='spawn' is not one of"):
        rank_start_method()
    monkeypatch.setenv(START_ENV, "auto")
    expected = "forkserver" if torch.cuda.is_available() else "fork"
    assert rank_start_method() == expected
