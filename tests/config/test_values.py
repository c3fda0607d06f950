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


@pytest.mark.parametrize("text, message", [
    ("? [a, b]\n: 1\n", "line 1: a list is no flag name"),                       # was TypeError: unhashable
    ("? {a: 1}\n: 1\n", "line 1: a dict is no flag name"),
    ("lr: " + "9" * 400 + "\n", "lr: 9{400} is not a valid float"),              # was OverflowError
    ("save: {a: 1}\n", r"save: \{'a': 1\} is not a valid str"),                 # was saved to "{'a': 1}"
    ("data-path: [a, null]\n", r"data-path: \['a', None\] is not a valid str"),  # was the prefix "None"
    ("save: true\n", "save: True is not a valid str"),
    ("lr: null\n", r"lr is null; give it a value or remove the key \(default 0.0003\)"),   # was lr=None, then TypeError
    ("num-layers: null\n", r"num-layers is null; give it a value or remove the key \(default 2\)"),
])
def test_a_config_value_that_is_no_value_of_the_flag_is_refused_in_one_line(tmp_path, text, message):
    argv = config(tmp_path, text)
    with pytest.raises(ValueError, match=f"^--config {argv[1]}: {message}") as error:
        parse_args(MOCK + argv, world_size=1)
    assert "\n" not in str(error.value)


def test_null_for_a_flag_without_a_default_is_its_default(tmp_path):
    *_, training = parse_args(MOCK + config(tmp_path, "save: null\nglobal-batch-size: null\n"), world_size=1)
    assert training.save is None and training.global_batch_size == 1


def test_yaml_merge_keys_work_and_an_explicit_key_overrides_the_merged_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base\n  num-layers: 3\n  lr: 0.5\nrun:\n  <<: *base\n  lr: 0.25\n")
    import yaml

    from megalite.training.arguments import _UniqueKeyLoader
    document = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    assert document["run"] == {"num-layers": 3, "lr": 0.25}
