"""Presets, the cpu calibration file, --cluster overrides and their one-line errors."""
import json
import pathlib

import pytest

from megalite.scaling.hardware import PRESETS, from_calibration, load_hardware

EXAMPLE = str(pathlib.Path(__file__).with_name("cpu_calibration.json"))


def test_a100_80gb_preset_is_the_data_sheet():
    hw = PRESETS["a100-80gb"]
    assert hw.peak("bfloat16") == hw.peak("float16") == 312.0 and hw.hbm_gb == 80.0 and hw.hbm_gbs == 2039.0
    assert hw.intra_node.bandwidth_gbs == 300.0 and hw.inter_node.bandwidth_gbs == 25.0 and hw.gpus_per_node == 8


def test_cpu_reads_the_calibration_file():
    hw = load_hardware("cpu", calibration=EXAMPLE)
    assert hw.name == "example-cpu" and hw.peak("float32") == 0.2 and hw.hbm_gbs == 20.0 and hw.hbm_gb == 16
    assert hw.matmul[0] == (256, 256, 256, "float32", 0.05, "nn") and hw.optimizer_bytes_per_s == 4e9
    assert hw.intra_node.bandwidth_gbs == 5.0 and hw.inter_node.latency_us == 50.0 and hw.gpus_per_node == 2
    assert hw.attention == () and hw.elementwise == ()      # a file from before the tables loads as before


def _with_tables(attention_rate=0.1, gbs=5.0):
    with open(EXAMPLE) as f:
        document = json.load(f)
    document["attention"] = [{"heads": 16, "s": 256, "d": 32, "dtype": "float32", "forward_tflops": attention_rate,
                              "backward_tflops": 0.05}]
    document["elementwise"] = [{"op": "norm", "dtype": "float32", "bytes": 1 << 20, "forward_gbs": gbs,
                                "backward_gbs": 2.5}]
    return document


def test_calibration_tables_load():
    hw = from_calibration(_with_tables())
    assert hw.attention == ((16, 256, 32, "float32", 0.1, 0.05),)
    assert hw.elementwise == (("norm", "float32", 1 << 20, 5.0, 2.5),)


@pytest.mark.parametrize("kwargs, message", [(dict(attention_rate=0.0), "attention row"),
                                             (dict(gbs=-1.0), "elementwise row")])
def test_non_positive_table_rate_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_calibration(_with_tables(**kwargs), "bad.json")


def test_cluster_file_overrides_fields(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("hbm_gb: 96\ninter_node: {bandwidth_gbs: 50}\npeak_tflops: {bfloat16: 400}\n")
    hw = load_hardware("a100-80gb", gpus_per_node=4, cluster=str(cluster))
    assert (hw.hbm_gb, hw.inter_node.bandwidth_gbs, hw.inter_node.latency_us) == (96, 50.0, 10.0)
    assert hw.peak("bfloat16") == 400.0 and hw.peak("float32") == 19.5 and hw.gpus_per_node == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu="b300"), "--gpu b300 is not known"),
    (dict(gpu="cpu"), "pass --calibration FILE.json"),
    (dict(gpu="cpu", calibration="/nonexistent.json"), "--calibration /nonexistent.json"),
])
def test_bad_hardware_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_hardware(**kwargs)


def test_unknown_cluster_field(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("hbm: 96\n")
    with pytest.raises(ValueError, match="'hbm' is not a hardware field"):
        load_hardware("h100-sxm", cluster=str(cluster))


def test_collective_fits_load_per_gap_and_from_older_files():
    with open(EXAMPLE) as f:
        document = json.load(f)
    document["collectives"] = {"all_reduce": [{"gap_s": 0.002, "bandwidth_gbs": 1.0, "latency_us": 500.0},
                                              {"gap_s": 0.008, "bandwidth_gbs": 0.5, "latency_us": 900.0}],
                               "send_recv": {"bandwidth_gbs": 4.0, "latency_us": 50.0}}   # a file before gaps
    hw = from_calibration(document)
    assert hw.intra_node.for_collective("all_reduce", 0.008) == hw.inter_node.for_collective("all_reduce", 0.1)
    assert hw.intra_node.for_collective("all_reduce", 0.008).latency_us == 900.0
    assert hw.intra_node.for_collective("send_recv", 0.005).bandwidth_gbs == 4.0
    assert not hw.overlaps_communication
    document["collectives"]["send_recv"]["bandwidth_gbs"] = 0.0
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        from_calibration(document)
