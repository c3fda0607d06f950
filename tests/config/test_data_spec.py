"""--split and --data-path blends are refused at the command line, in one line, unless the data pipeline
would read exactly what was written (megalite/config/data_spec.py)."""
import pytest

from megalite.config.data_spec import parse_blend, split_weights
from megalite.data.gpt_dataset import parse_split
from megalite.training.arguments import parse_args


@pytest.mark.parametrize("split", ["nan,1,1", "inf", "1,-inf", "1e400,1", "-1,2", "0,0", "1,2,3,4", "..", "a,b"])
def test_bad_split_is_one_line_naming_it(split):
    with pytest.raises(ValueError, match="--split") as error:
        parse_args(["--mock-data", f"--split={split}"], world_size=1)
    assert "\n" not in str(error.value) and repr(split) in str(error.value)


def test_split_in_scientific_notation_is_read_as_written():
    # The pipeline once picked the digits out of "1e3,2" and trained on a 1/3/2 split.
    assert split_weights("1e3,2") == [1000.0, 2.0]
    assert parse_split("1e3,2")[0] == (0.0, pytest.approx(1000 / 1002))
    assert parse_split("98/2")[1] == (pytest.approx(0.98), pytest.approx(1.0))


@pytest.mark.parametrize("weight", ["nan", "inf", "1e400", "0", "-1"])
def test_non_finite_blend_weight_is_refused_at_the_command_line(weight):
    with pytest.raises(ValueError, match="--data-path weight .* must be a finite, positive number") as error:
        parse_args(["--mock-data", "--data-path", weight, "a", "1", "b"], world_size=1)
    assert "\n" not in str(error.value)


def test_blend_and_plain_prefixes():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend("a") == (["a"], None)
    with pytest.raises(ValueError, match="--data-path weight -inf must be a finite, positive number"):
        parse_blend(["1", "a", "-inf", "b"])


def test_an_empty_split_part_is_refused_but_a_trailing_comma_is_not():
    from megalite.config.data_spec import split_weights
    with pytest.raises(ValueError, match="has an empty part"):
        split_weights("969,,1")                    # would have made the test share the validation share
    assert split_weights("98,2,") == [98.0, 2.0]
