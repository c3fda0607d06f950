"""Flags that used to be dropped without a word: tokenizer files without a tokenizer, --profile without a
profiler, --distributed-backend nccl without CUDA.  Each now does what Megatron does or stops in one line."""
import pytest
import torch

from megalite.config.settings import TrainingConfig
from megalite.training import profiling
from megalite.training.arguments import check_machine, parse_args
from tests.training.test_cli_errors import assert_one_line_error, run_cli

TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--vocab-file", "v.json", "--merge-file", "m.txt"],
     "--vocab-file and --merge-file are read only by a --tokenizer-type, and none is given; add --tokenizer-type "
     "(GPT2BPETokenizer for GPT-2's vocab and merges), as Megatron-LM requires"),
    (["--vocab-file", "v.json"], "--vocab-file is read only by a --tokenizer-type, and none is given"),
    (["--tokenizer-model", "t.json"], "add --tokenizer-type (HuggingFaceTokenizer or TikTokenizer for a "
                                      "--tokenizer-model)"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--merge-file", "m.txt"],
     "--merge-file is read only by a --tokenizer-type, and NullTokenizer is given"),
])
def test_tokenizer_files_no_tokenizer_reads_are_refused(argv, message):
    with pytest.raises(ValueError) as error:
        parse_args(TINY + argv, world_size=1)
    assert message in str(error.value)


def test_gpt2_files_with_their_tokenizer_type_still_parse():
    data = parse_args(TINY + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v", "--merge-file", "m"],
                      world_size=1)[3]
    assert (data.vocab_file, data.merge_file) == ("v", "m")


def _configs(argv):
    _, parallel, _, _, train = parse_args(TINY + argv, world_size=1)
    return parallel, train


def test_nccl_and_nsys_profile_are_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^--distributed-backend nccl needs CUDA GPUs and this machine has none; "
                                         "use --distributed-backend gloo"):
        check_machine(*_configs(["--distributed-backend", "nccl"]))
    with pytest.raises(ValueError, match="^--profile alone is Megatron's nsys capture .* add --use-pytorch-profiler"):
        check_machine(*_configs(["--profile"]))
    check_machine(*_configs(["--distributed-backend", "gloo", "--profile", "--use-pytorch-profiler"]))


def test_with_cuda_neither_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_machine(*_configs(["--distributed-backend", "nccl", "--profile"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_nccl_on_a_cpu_machine_is_one_line_without_a_traceback():
    assert_one_line_error(run_cli("--mock-data", "--distributed-backend", "nccl"),
                          "--distributed-backend nccl needs CUDA GPUs")


class _FakeCudart:
    def __init__(self):
        self.calls = []

    def cudaProfilerStart(self):
        self.calls.append("start")

    def cudaProfilerStop(self):
        self.calls.append("stop")


def test_profile_alone_opens_and_closes_megatrons_nsys_window(monkeypatch):
    cudart = _FakeCudart()
    monkeypatch.setattr(profiling.torch.cuda, "cudart", lambda: cudart)
    profiler = profiling.StepProfiler(TrainingConfig(profile=True, profile_step_start=2, profile_step_end=4), rank=0)
    seen = []
    for step in range(1, 7):
        profiler.before_step(step)
        seen.append((step, list(cudart.calls)))
        profiler.after_step(step)
    # Steps 2 and 3 run inside the capture: start before step 2, stop after step 3, once.
    assert seen[0] == (1, []) and seen[1] == (2, ["start"]) and seen[2] == (3, ["start"])
    assert cudart.calls == ["start", "stop"]
    other_rank = profiling.StepProfiler(TrainingConfig(profile=True, profile_step_start=2, profile_step_end=4), rank=1)
    other_rank.before_step(2)
    assert cudart.calls == ["start", "stop"]
