"""megalite-plan end to end: the JSON line, chosen sizes, --search, the cpu calibration, --calibrate
wiring, and bad input as one line."""
import json
import pathlib
import sys
import types

import pytest

from megalite.plan import main
from megalite.scaling.planner import with_flags

EXAMPLE = str(pathlib.Path(__file__).parent / "scaling" / "cpu_calibration.json")
SMALL = ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
         "--vocab-size", "32000", "--bf16"]
FIELDS = {"params", "flops_per_iteration", "iteration_time_s", "tflops_per_gpu", "mfu", "memory_gb_per_gpu",
          "activation_bytes_per_layer", "bubble_fraction", "micro_batch_size", "virtual_pipeline_model_parallel_size",
          "fits", "breakdown"}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_line_has_the_fields_and_chosen_sizes(capsys):
    code, out, _ = run(capsys, "--world-size", "16", "--gpu", "h100-sxm", *SMALL, "--global-batch-size", "64",
                       "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert FIELDS <= set(result)
    assert set(result["breakdown"]) == {"compute", "exposed_communication", "bubble", "optimizer", "host_overhead"}
    assert result["chosen"] == ["micro_batch_size", "virtual_pipeline_model_parallel_size"]
    assert "(chosen)" in out and result["fits"]
    assert result["iteration_time_s"] == pytest.approx(sum(result["breakdown"].values()), rel=1e-9)
    # model FLOPs over time and GPUs
    assert result["tflops_per_gpu"] == pytest.approx(
        result["flops_per_iteration"] / result["iteration_time_s"] / 16 / 1e12)


def test_given_sizes_are_kept(capsys):
    code, out, _ = run(capsys, "--world-size", "8", *SMALL, "--global-batch-size", "32", "--micro-batch-size", "2",
                       "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["chosen"] == []
    assert (result["micro_batch_size"], result["virtual_pipeline_model_parallel_size"]) == (2, 2)


def test_search_ranks_layouts_and_gives_reasons(capsys):
    code, out, _ = run(capsys, "--search", "--world-size", "8", "--gpu", "a100-40gb", *SMALL,
                       "--global-batch-size", "16", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    speeds = [c["tflops_per_gpu"] for c in result["fits"]]
    assert speeds == sorted(speeds, reverse=True) and len(speeds) > 3
    reasons = " ".join(r["reason"] for r in result["rejected"])
    assert "is not divisible" in reasons or "do not" in reasons


def test_cpu_calibration(capsys):
    code, out, _ = run(capsys, "--gpu", "cpu", "--calibration", EXAMPLE, "--world-size", "2",
                       "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["hardware"] == "example-cpu" and result["layout"]["dtype"] == "float32"
    assert result["mfu"] == pytest.approx(result["tflops_per_gpu"] / 0.2)
    # the example file records no allocator setting: glibc's default, whose resident peak can exceed the model's
    assert "ran with glibc's default allocator" in out and "MALLOC_MMAP_THRESHOLD_=524288" in out


def test_a_calibration_under_a_fixed_threshold_names_it(capsys, tmp_path):
    document = json.loads(pathlib.Path(EXAMPLE).read_text())
    document["malloc_mmap_threshold"] = 524288
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(document))
    code, out, _ = run(capsys, "--gpu", "cpu", "--calibration", str(fixed), "--world-size", "2",
                       "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4")
    assert code == 0 and "ran with MALLOC_MMAP_THRESHOLD_=524288: the step times and peak hold for runs with" in out


def test_calibrate_calls_the_calibration_module(capsys, monkeypatch, tmp_path):
    calls = []
    module = types.ModuleType("megalite.calibration.calibrate")
    module.calibrate = lambda path, ranks=2: calls.append(path) or {}
    monkeypatch.setitem(sys.modules, "megalite.calibration.calibrate", module)
    code, out, _ = run(capsys, "--calibrate", str(tmp_path / "out.json"))
    assert code == 0 and calls == [str(tmp_path / "out.json")]


@pytest.mark.parametrize("argv, message", [
    (["--world-size", "6", "--tensor-model-parallel-size", "4"], "world size 6 is not divisible"),
    (["--gpu", "tpu"], "--gpu tpu is not known"),
    (["--world-size", "0"], "--world-size 0 must be at least 1"),
    (["--world-size", "8", "--num-layers", "3", "--pipeline-model-parallel-size", "2"], "3 layers do not split evenly"),
    (["--world-size", "1", "--num-layers", "8", "--hidden-size", "65536", "--num-attention-heads", "64",
      "--global-batch-size", "1", "--gpu", "a100-40gb"], "no micro-batch / virtual pipeline size fits"),
    (["--world-size", "8", "--num-experts", "4", "--disable-bias-linear", "--expert-model-parallel-size", "3"],
     "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("megalite-plan: error: ") and message in err


def test_with_flags_replaces_and_removes():
    argv = ["--a", "1", "--b=2", "--switch", "--c", "3"]
    assert with_flags(argv, {"--a": 5, "--b": None, "--switch": None, "--d": True}) == ["--c", "3", "--a", "5", "--d"]


def test_sizes_in_a_config_file_count_as_given(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("micro-batch-size: 2\npipeline-model-parallel-size: 2\nnum-layers: 8\n")
    code, out, _ = run(capsys, "--world-size", "8", "--config", str(config), "--hidden-size", "1024",
                       "--num-attention-heads", "16", "--seq-length", "1024", "--global-batch-size", "32", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["chosen"] == ["virtual_pipeline_model_parallel_size"]
    assert result["micro_batch_size"] == 2 and result["layout"]["pp"] == 2


def test_a_whole_layout_that_does_not_fit_is_still_predicted(capsys):
    code, out, _ = run(capsys, "--world-size", "1", "--gpu", "a100-40gb", "--num-layers", "8", "--hidden-size", "16384",
                       "--num-attention-heads", "64", "--micro-batch-size", "1", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and not result["fits"] and result["memory_gb_per_gpu"] > 40 and "DOES NOT FIT" in out


def test_an_moe_run_prints_its_expert_parallel_size(capsys):
    code, out, _ = run(capsys, "--world-size", "8", "--gpu", "h100-sxm", *SMALL, "--disable-bias-linear",
                       "--num-experts", "4", "--expert-model-parallel-size", "2", "--micro-batch-size", "1", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and ", DP 8, EP 2, bfloat16" in out.splitlines()[0] and result["layout"]["ep"] == 2
