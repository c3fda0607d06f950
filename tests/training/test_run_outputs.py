"""What a run leaves beside its log line: TensorBoard events, a Weights & Biases run, profiler traces,
and its resolved settings; and the YAML file that can set them (--config)."""
import glob
import json
import os
import struct

import pytest
import yaml

from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1000", "--seed", "7", "--eval-interval", "3", "--eval-iters", "1"]


def _pretrain(rank, world_size, argv, env):
    os.environ.update(env)
    from megalite.training.loop import pretrain
    return pretrain(argv)


def test_tensorboard_events_hold_the_loss(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    folder = tmp_path / "tb"
    history = run_on_ranks(_pretrain, 1, TINY + ["--train-iters", "3", "--tensorboard-dir", str(folder),
                                                 "--log-validation-ppl-to-tensorboard"], {}, timeout=120)[0]
    events = event_accumulator.EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("lm loss", "learning-rate", "grad-norm", "loss-scale", "throughput/tokens-per-sec",
                "throughput/mfu", "memory/peak-mb", "lm loss validation", "lm loss validation ppl"):
        assert tag in scalars, tag
    loss = events.Scalars("lm loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [e.step for e in events.Scalars("lm loss validation")] == [3]
    # The resolved settings land next to the events.
    assert yaml.safe_load((folder / "config.yaml").read_text())["train_iters"] == 3


def wandb_history(path: str) -> list:
    """The ``run.log`` rows of an offline W&B run file: after a 7-byte header, LevelDB's log format
    (32 KiB blocks of records: crc32c, length, type FULL/FIRST/MIDDLE/LAST) around wandb's Record protos."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, rows = open(path, "rb").read(), 7, 32768, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):   # a block's zero-filled tail
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                              # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_logs_the_same_scalars(tmp_path):
    pytest.importorskip("wandb")
    folder = tmp_path / "wandb"
    argv = TINY + ["--train-iters", "3", "--wandb-project", "megalite-test", "--wandb-exp-name", "tiny",
                   "--wandb-save-dir", str(folder)]
    history = run_on_ranks(_pretrain, 1, argv, {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}, timeout=180)[0]
    runs = glob.glob(str(folder / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1, runs
    rows = [row for row in wandb_history(runs[0]) if "lm loss" in row]   # (wandb adds rows of its own)
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert [row["lm loss"] for row in rows] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [row["learning-rate"] for row in rows] == pytest.approx([r["lr"] for r in history])
    assert "lm loss validation" in rows[2] and "lm loss validation" not in rows[0]


def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path, capfd):
    argv = TINY + ["--train-iters", "4", "--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                   "--profile-step-end", "4", "--profile-dir", str(tmp_path)]
    run_on_ranks(_pretrain, 1, argv, {}, timeout=120)
    trace = tmp_path / "trace_rank0_steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)   # operators were recorded
    assert f"[rank 0] profiler trace of steps 2-3: {trace}" in capfd.readouterr().out


def test_yaml_config_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 4\nhidden_size: 48\nnum-attention-heads: 4\nlr: 0.01\nswiglu: true\n"
                    "disable-bias-linear: true\nrampup-batch-size: [2, 2, 8]\nmock-data: true\n"
                    "global-batch-size: 4\nlr-decay-style: cosine\n")
    model, _, opt, _, train = parse_args(["--config", str(path), "--hidden-size", "64", "--lr", "0.02"],
                                         world_size=1)
    assert (model.num_layers, model.hidden_size, model.swiglu, model.add_bias_linear) == (4, 64, True, False)
    assert opt.lr == 0.02 and train.lr_decay_style == "cosine" and train.rampup_batch_size == [2, 2, 8]


@pytest.mark.parametrize("text, message", [
    ("num-layer: 4\n", "'num-layer' is not a flag"),
    ("swiglu: 1\n", "swiglu is a switch; give true or false"),
    ("num-layers: four\n", "num-layers: 'four' is not a valid int"),
    ("normalization: BatchNorm\n", "normalization: 'BatchNorm' is not one of LayerNorm, RMSNorm"),
    ("- 1\n- 2\n", "must hold a mapping of flag names to values"),
    ("a: [\n", "is not valid YAML"),
])
def test_yaml_config_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        parse_args(["--mock-data", "--config", str(path)], world_size=1)
    assert str(path) in str(error.value) and message in str(error.value)


def test_resolved_config_reads_back_to_the_same_settings(tmp_path):
    from megalite.training.arguments import resolved_config
    argv = TINY + ["--train-samples", "40", "--group-query-attention", "--num-query-groups", "2",
                   "--disable-bias-linear", "--save", str(tmp_path)]
    configs = parse_args(argv, world_size=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(resolved_config(configs)))
    assert parse_args(["--config", str(path)], world_size=1) == configs


class _Summary:
    def __init__(self):
        self.tags = []

    def add_scalar(self, tag, value, step):
        self.tags.append(tag)


@pytest.mark.parametrize("flag", [False, True])
def test_validation_perplexity_goes_to_tensorboard_only_with_megatrons_switch(tmp_path, flag):
    pytest.importorskip("tensorboard")
    from megalite.training.arguments import parse_args
    from megalite.training.metric_writers import build_writers
    argv = TINY + ["--tensorboard-dir", str(tmp_path)] + (["--log-validation-ppl-to-tensorboard"] if flag else [])
    (writer,) = build_writers(parse_args(argv, world_size=1)[4], rank=0, settings={})
    writer.summary.close()
    writer.summary = _Summary()
    writer.write({"iteration": 3, "loss": 2.0, "eval_loss": 2.5, "eval_ppl": 12.18})
    assert "lm loss validation" in writer.summary.tags
    assert ("lm loss validation ppl" in writer.summary.tags) == flag
