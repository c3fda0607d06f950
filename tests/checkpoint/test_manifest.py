"""A manifest whose file entries are damaged (no size, a size as text, a fractional or out-of-range CRC, no
mapping) is one CheckpointError naming it, not a KeyError or TypeError from the verification."""
import json

import pytest

from megalite.checkpoint.manifest import MANIFEST, CheckpointError, read_manifest


@pytest.mark.parametrize("entry", ["x", {}, {"bytes": 10}, {"crc32": 1}, {"bytes": "10", "crc32": 1},
                                   {"bytes": 10, "crc32": 1.5}, {"bytes": 10, "crc32": 2 ** 80},
                                   {"bytes": -1, "crc32": 1}, {"bytes": True, "crc32": 1}, None, [10, 1]])
def test_a_damaged_entry_is_one_line_naming_the_manifest(tmp_path, entry):
    path = tmp_path / MANIFEST
    path.write_text(json.dumps({"run_id": "r", "iteration": 2, "files": {"mp_rank_00_000/model_optim_rng.pt": entry}}))
    with pytest.raises(CheckpointError, match=f"^{path}: the entry of mp_rank_00_000/model_optim_rng.pt is") as error:
        read_manifest(str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_whole_entry_reads(tmp_path):
    files = {"a.pt": {"bytes": 0, "crc32": 0}, "b.pt": {"bytes": 12, "crc32": 2 ** 32 - 1}}
    (tmp_path / MANIFEST).write_text(json.dumps({"run_id": "r", "iteration": 2, "files": files}))
    assert read_manifest(str(tmp_path))["files"] == files
