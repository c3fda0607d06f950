"""Numbers from the command line or a --config file are checked in one place: finite (NaN passes every
range comparison), integers exactly integers, and a key given twice in a config refused."""
import pytest

from megalite.training.arguments import parse_args

MOCK = ["--mock-data"]


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--weight-decay", "--adam-beta1", "--init-method-std",
                                  "--hidden-dropout", "--clip-grad"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused(flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number, got {value.replace('+', '')}$"):
        parse_args(MOCK + [f"{flag}={value}"], world_size=1)


def config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return ["--config", str(path)]


@pytest.mark.parametrize("text, wrong", [("num-layers: 2.9\n", "2.9"), ("num-layers: true\n", "True"),
                                         ("lr: true\n", "True")])
def test_a_config_value_of_the_wrong_type_is_refused(tmp_path, text, wrong):
    argv = config(tmp_path, text)
    key = text.split(":")[0]
    with pytest.raises(ValueError, match=f"{key}: {wrong} is not a valid (int|float)$"):
        parse_args(MOCK + argv, world_size=1)


def test_a_config_number_written_as_text_still_reads():
    """YAML reads 1e-3 (no dot) as a string; the command line would take it, so the config does too."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("lr: 1e-3\nnum-layers: 3\n")
    model, _, opt, _, _ = parse_args(MOCK + ["--config", f.name], world_size=1)
    assert opt.lr == 1e-3 and model.num_layers == 3


def test_a_key_given_twice_is_refused(tmp_path):
    argv = config(tmp_path, "num-layers: 2\nlr: 0.1\nnum-layers: 4\n")
    with pytest.raises(ValueError, match=r"'num-layers' is given twice \(lines 1 and 3\); keep one$"):
        parse_args(MOCK + argv, world_size=1)


def test_two_spellings_of_one_flag_are_refused(tmp_path):
    argv = config(tmp_path, "num_layers: 2\nnum-layers: 4\n")
    with pytest.raises(ValueError, match="'num_layers' and 'num-layers' are the same flag; keep one$"):
        parse_args(MOCK + argv, world_size=1)
