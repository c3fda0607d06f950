"""The planner's overlap flags (overlap.py, options.py): each hides what its model says, no more, and
needs what Megatron needs."""
import dataclasses

import pytest

from megalite.scaling import overlap
from megalite.scaling.hardware import PRESETS
from megalite.scaling.planner import predict_argv

H100 = PRESETS["h100-sxm"]
MODEL = ["--num-layers", "16", "--hidden-size", "4096", "--num-attention-heads", "32", "--seq-length", "2048",
         "--max-position-embeddings", "2048", "--vocab-size", "50257", "--bf16"]
TP_SP = ["--tensor-model-parallel-size", "8", "--sequence-parallel", "--micro-batch-size", "1",
         "--global-batch-size", "16"]


def test_tp_overlap_is_hidden_by_the_gemms_but_one_chunk():
    assert overlap.tp_exposed(1.0, 5.0, 8, True) == pytest.approx(1 / 8)     # GEMMs longer: one chunk shows
    assert overlap.tp_exposed(1.0, 0.5, 8, True) == pytest.approx(0.5)       # GEMMs shorter: the rest shows
    assert overlap.tp_exposed(1.0, 5.0, 8, False) == 1.0
    assert overlap.p2p_exposed(1.0, 0.25, True) == 0.75 and overlap.p2p_exposed(1.0, 0.25, False) == 1.0
    assert overlap.behind(1.0, 3.0, True) == 0.0 and overlap.behind(1.0, 3.0, False) == 1.0


def test_tp_comm_overlap_cuts_exposed_communication_only():
    plain = predict_argv(MODEL + TP_SP, H100, 16)
    overlapped = predict_argv(MODEL + TP_SP + ["--tp-comm-overlap"], H100, 16)
    assert overlapped.breakdown["compute"] == plain.breakdown["compute"]
    assert overlapped.breakdown["exposed_communication"] < 0.75 * plain.breakdown["exposed_communication"]
    # where nothing overlaps (a CPU's gloo), the flag changes nothing
    cpu_like = dataclasses.replace(H100, overlaps_communication=False)
    assert predict_argv(MODEL + TP_SP + ["--tp-comm-overlap"], cpu_like, 16).iteration_time_s == pytest.approx(
        predict_argv(MODEL + TP_SP, cpu_like, 16).iteration_time_s)


def test_param_gather_overlap_hides_the_zero_gather():
    flags = MODEL + ["--micro-batch-size", "1", "--global-batch-size", "64", "--use-distributed-optimizer",
                     "--overlap-grad-reduce"]
    exposed = predict_argv(flags, H100, 16)
    hidden = predict_argv(flags + ["--overlap-param-gather"], H100, 16)
    assert hidden.iteration_time_s < exposed.iteration_time_s
    assert hidden.breakdown["compute"] == exposed.breakdown["compute"]


def test_interleaved_messages_overlap_by_default():
    flags = MODEL + ["--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2",
                     "--micro-batch-size", "1", "--global-batch-size", "16"]
    slow_link = dataclasses.replace(H100, gpus_per_node=1)     # every stage boundary on the network
    overlapped = predict_argv(flags, slow_link, 4)
    blocking = predict_argv(flags + ["--no-overlap-p2p-communication"], slow_link, 4)
    assert overlapped.iteration_time_s < blocking.iteration_time_s


@pytest.mark.parametrize("flags, needs", [
    (["--tensor-model-parallel-size", "8", "--tp-comm-overlap"], "--sequence-parallel"),
    (["--overlap-param-gather", "--overlap-grad-reduce"], "--use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-grad-reduce"),
    (["--fp8-format", "e5m2"], "invalid choice"),
])
def test_flags_that_need_others_are_refused_in_one_line(flags, needs):
    with pytest.raises(ValueError, match=needs) as error:
        predict_argv(MODEL + ["--micro-batch-size", "1"] + flags, H100, 16)
    assert "\n" not in str(error.value)


def test_fp8_runs_the_linear_gemms_at_the_fp8_peak():
    flags = MODEL + ["--micro-batch-size", "4", "--global-batch-size", "64"]
    bf16 = predict_argv(flags, H100, 16)
    fp8 = predict_argv(flags + ["--fp8-format", "hybrid"], H100, 16)
    assert fp8.breakdown["compute"] < bf16.breakdown["compute"]
    # only the linears change: not faster than twice, the attention and elementwise work stay
    assert fp8.breakdown["compute"] > 0.5 * bf16.breakdown["compute"]
    with pytest.raises(ValueError, match="a100-80gb has no peak TFLOP/s for fp8"):
        predict_argv(flags + ["--fp8-format", "e4m3"], PRESETS["a100-80gb"], 16)


def test_overlapped_communication_takes_its_sms_from_the_compute():
    # 7/8 of 1 s hidden behind GEMMs on a GPU whose collective holds half the SMs: the GEMMs take as long again
    assert overlap.tp_exposed(1.0, 5.0, 8, True, 0.5) == pytest.approx(1 / 8 + 7 / 8)
    assert overlap.behind(1.0, 3.0, True, 0.25) == pytest.approx(1.0 / 3)
    assert overlap.behind(1.0, 3.0, False, 0.25) == 1.0
