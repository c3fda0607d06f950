"""The tracker file (latest_checkpointed_iteration.txt) holds ASCII digits; anything else is one line
naming the file, whatever its bytes."""
import os

import pytest

from megalite.checkpoint import paths


@pytest.mark.parametrize("content", [b"", b"abc", b"-1", b"2.0", b"\xff\xfe", b"2\xff", "\u00b2".encode(),
                                     "\u0662".encode(), b"\x00", "é".encode()])
def test_a_tracker_that_is_no_number_is_one_line_naming_it(tmp_path, content):
    # "²" passed str.isdigit and int() failed with a message naming no file; Arabic-Indic digits were read
    # as a number; invalid UTF-8 raised UnicodeDecodeError.
    (tmp_path / paths.TRACKER_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=f"^{tmp_path / paths.TRACKER_FILE} should hold an iteration number") as error:
        paths.read_latest_iteration(str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_tracker_that_is_a_folder_is_named(tmp_path):
    os.makedirs(tmp_path / paths.TRACKER_FILE)
    with pytest.raises(ValueError, match="is a folder, not the file naming the latest iteration"):
        paths.read_latest_iteration(str(tmp_path))


def test_tracker_digits_with_whitespace_and_long_numbers(tmp_path):
    (tmp_path / paths.TRACKER_FILE).write_text(" 12\n")
    assert paths.read_latest_iteration(str(tmp_path)) == 12
    (tmp_path / paths.TRACKER_FILE).write_text("9" * 80)
    assert paths.read_latest_iteration(str(tmp_path)) == int("9" * 80)
    assert paths.read_latest_iteration(str(tmp_path / "nothing")) is None
