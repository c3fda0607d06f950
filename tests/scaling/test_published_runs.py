"""The later published runs (published.later_runs: Megatron-LM's H100 table and strong scaling, Llama 3
405B, OPT-175B, Megatron-LM's Mixtral 8x7B), each planned as published from its preset alone -- no per-row constant.

Targets: every run fits its GPU as published (no false refusal), the model's parameter count is the
source's, and the predicted TFLOP/s per GPU (in the source's FLOP convention) is within 15%.  The H100
preset's one fitted constant (``sustained_fraction``, scaling/fit.py) is fitted to the README table's
nine runs only: the test refits it, and the held-out runs (strong scaling, Llama 3, Mixtral) check it;
OPT-175B is held out of the A100's fit (to Narayanan's Table 1, test_validate.py)."""
import pytest

from megalite.scaling.compare import predicted_tflops, ratio
from megalite.scaling.fit import is_fit_run, median_ratio_at
from megalite.scaling.hardware import PRESETS
from megalite.scaling.published import MEGATRON_H100_WEAK, later_runs
from megalite.scaling.validate import later_predictions

TOLERANCE = 0.15


@pytest.fixture(scope="module")
def predictions():
    return {run.name: (run, candidate) for run, candidate in later_predictions()}


def test_every_run_is_listed_once(predictions):
    assert len(predictions) == len(later_runs()) == 16


def test_no_false_refusals(predictions):
    for name, (_run, candidate) in predictions.items():
        assert candidate.prediction.fits, (name, candidate.prediction.memory_gb_per_gpu)


def test_parameter_counts_are_the_sources(predictions):
    for params, *_rest in MEGATRON_H100_WEAK:
        p = predictions[f"Megatron H100 {params:g}B"][1].prediction
        assert p.params / 1e9 == pytest.approx(params, rel=0.04)
    assert predictions["Llama 3 405B 8K, 8192 GPUs"][1].prediction.params / 1e9 == pytest.approx(405, rel=0.01)
    assert predictions["OPT-175B FSDP"][1].prediction.params / 1e9 == pytest.approx(175, rel=0.01)
    assert predictions["Mixtral 8x7B, 64 GPUs"][1].prediction.params / 1e9 == pytest.approx(46.7, rel=0.01)


def test_llama3_is_compared_in_palms_count(predictions):
    # The paper's MFU is PaLM's (Chowdhery et al., Appendix B): 6N + 12 L H Q T FLOPs a token, the attention
    # over the full sequence; 126 layers, 128 heads of 128, every parameter counted.
    for name, seq in (("Llama 3 405B 8K, 8192 GPUs", 8192), ("Llama 3 405B 128K, CP 16", 131072)):
        run, candidate = predictions[name]
        p = candidate.prediction
        assert run.convention == "palm"
        tokens_per_s = 16 * 2 ** 20 / p.iteration_time_s      # 16M tokens a step (Table 4)
        expected = tokens_per_s * (6 * p.params + 12 * 126 * 128 * 128 * seq) / run.gpus / 1e12
        assert predicted_tflops(run, candidate) == pytest.approx(expected, rel=1e-9)


def _ratio(predictions, name):
    run, candidate = predictions[name]
    return predicted_tflops(run, candidate) / run.tflops_per_gpu


@pytest.mark.parametrize("name", sorted(r.name for r in later_runs()))
def test_within_15_percent(predictions, name):
    assert abs(_ratio(predictions, name) - 1) <= TOLERANCE, _ratio(predictions, name)


def test_llama3_runs_on_flashattention_2_and_its_rate_decides_the_128k_row():
    # The kernel is not published; FlashAttention-2 is assumed (published.py says why).  At 128K the attention
    # core is most of a layer, so the kernel's rate decides the row: with cuDNN's (Megatron's default on an
    # H100) the same run is predicted more than 15% fast, at 8K both kernels land within 15%.
    h100 = PRESETS["h100-sxm"]
    assert h100.fused_attention_efficiency("flash") < h100.fused_attention_efficiency("auto")
    for run in later_runs():
        if run.name.startswith("Llama 3"):
            flags = list(run.flags)
            assert flags[flags.index("--attention-backend") + 1] == "flash"
            cudnn = run._replace(flags=tuple(flags + ["--attention-backend", "auto"]))
            assert ratio(cudnn) > ratio(run)
            assert (ratio(cudnn) > 1 + TOLERANCE) == ("128K" in run.name), (run.name, ratio(cudnn))


def test_validate_prints_each_run_with_its_ratio(predictions, monkeypatch, capsys):
    from megalite.scaling import validate
    monkeypatch.setattr(validate, "later_predictions", lambda: list(predictions.values()))
    validate._print_later()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and " | " in line}
    for name in predictions:
        cells = lines[name].strip("| ").split(" | ")
        assert float(cells[5]) == pytest.approx(_ratio(predictions, name), abs=5e-4) and cells[9] == "yes"


def test_the_h100_fraction_is_the_fit_to_the_readme_table_alone():
    # Refit from the nine README runs: the preset holds what the fit gives (rounded), so the constant cannot be
    # tuned to the held-out runs, which are every other H100 run.
    fitted = {run.name for run in later_runs() if is_fit_run(run)}
    assert fitted == {f"Megatron H100 {p:g}B" for p, *_rest in MEGATRON_H100_WEAK}
    held_out = [run for run in later_runs() if run.gpu == "h100-sxm" and not is_fit_run(run)]
    assert len(held_out) == 6 and not fitted & {run.name for run in held_out}
    fraction = PRESETS["h100-sxm"].sustained_fraction      # the fit's root within 0.002 of it
    assert median_ratio_at("h100-sxm", fraction - 2e-3) < 1 < median_ratio_at("h100-sxm", fraction + 2e-3)
    assert PRESETS["h200"].sustained_fraction == PRESETS["h100-sxm"].sustained_fraction      # the same chip


def test_validate_marks_the_fit_runs(predictions, monkeypatch, capsys):
    from megalite.scaling import validate
    monkeypatch.setattr(validate, "later_predictions", lambda: list(predictions.values()))
    validate._print_later()
    fitted = {run.name for run in later_runs() if is_fit_run(run)}
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    roles = {cells[0]: cells[-1] for cells in rows if cells[0] in predictions}
    assert roles == {name: "fit" if name in fitted else "held out" for name in predictions}
