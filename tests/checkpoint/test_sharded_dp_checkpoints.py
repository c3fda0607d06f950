"""ZeRO-2 / ZeRO-3 checkpoints (--data-parallel-sharding-strategy) across layouts, and out to Hugging Face.

(Resuming at the same layout, bit for bit, is test_save_load.py's table: dp2-zero2, dp2-zero3, their bf16
runs and tp2-dp2-zero3.)

Reshard: each source layout trains 4 iterations, saving at 2 and 4 (the reshard matrix's pattern,
test_reshard.py).  Each target layout loads the source's iteration 2, saves it again at once, then
trains 2 more and saves:

- the logical tensors (index.py: every parameter, fp32 master and Adam moment as its TP=1 tensor) of
  the re-save equal the source's bit for bit: the load carried them all, whatever cut them;
- the losses of iterations 3 and 4 and the parameters at 4 follow the source's uninterrupted run
  (float32 round-off, as in the reshard matrix).
"""
import math
import os
from collections import defaultdict

import pytest
import torch

from megalite.checkpoint import merge, paths
from megalite.checkpoint.index import VOCAB_ROWS, Slice, fill_slice
from megalite.checkpoint.reader import CheckpointReader, SliceValues
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_reshard import MODEL, _assert_same_curve, _assert_same_params

ZERO3 = ["--data-parallel-sharding-strategy", "optim_grads_params"]
FLAGS = MODEL + ["--eval-interval", "2", "--eval-iters", "1"]   # evaluation runs under ZeRO-3 too
LAYOUTS = {   # name: (ranks, flags)
    "single": (1, []),
    "dp2-zero1": (2, ["--use-distributed-optimizer"]),
    "dp2-zero3": (2, ZERO3),
    "tp2-pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    # The tied embedding on two stages; prefetching, and several buckets per gather unit.
    "pp2-dp2-zero3": (4, ZERO3 + ["--pipeline-model-parallel-size", "2", "--overlap-param-gather",
                                  "--ddp-bucket-size", "500"]),
}
PAIRS = [("dp2-zero3", "single"), ("dp2-zero3", "dp2-zero1"), ("dp2-zero3", "tp2-pp2"), ("pp2-dp2-zero3", "dp2-zero3"),
         ("single", "dp2-zero3"), ("dp2-zero1", "dp2-zero3"), ("tp2-pp2", "dp2-zero3")]


def _runs(rank, world_size, runs):
    """Each (argv, save_first) in turn on these ranks: [(iteration, loss, eval loss), ...] per run, or the
    error of a run that failed.  ``save_first``: save right after setup (which loads --load), then train."""
    from megalite.parallel import state
    from megalite.training.loop import save, setup, train
    results = []
    for argv, save_first in runs:
        try:
            run = setup(argv)
            if save_first:
                save(run)
            results.append([(r["iteration"], r["loss"], r.get("eval_loss")) for r in train(run)])
        except ValueError as error:
            results.append(str(error))
        finally:
            if state.grid_is_initialized():
                state.destroy_grid()
    return results


def logical_state(root: str, iteration: int) -> dict:
    """{(name, kind): the whole logical tensor} of every parameter, master and Adam moment saved."""
    reader = CheckpointReader(root, iteration)
    parts = defaultdict(list)
    for part in map(Slice.from_saved, reader.load(paths.TENSOR_INDEX)["slices"]):
        parts[(part.name, part.kind)].append(part)
    read = SliceValues(lambda relative: reader.load(relative, mmap=True))
    state = {}
    for key, sources in parts.items():
        shape = list(sources[0].shape)
        target = Slice(name=key[0], kind=key[1], shape=shape, dim=None, offset=0, local_shape=shape, start=0,
                       end=math.prod(shape))
        values = torch.empty(target.end, dtype=read(sources[0]).dtype)
        fill_slice(values, target, sources, read)
        state[key] = values.view(shape)
    return state


def assert_same_logical_state(saved: dict, loaded: dict, what: str) -> None:
    """Bit for bit; the vocabulary rows only one layout pads (TP=2 pads to twice the rows) are zero."""
    assert set(saved) == set(loaded), f"{what}: {sorted(set(saved) ^ set(loaded))}"
    assert {kind for _, kind in saved} >= {"param", "exp_avg", "exp_avg_sq"}, what
    for key, value in saved.items():
        other = loaded[key]
        if key[0] in VOCAB_ROWS:
            rows = min(len(value), len(other))
            assert not value[rows:].any() and not other[rows:].any(), f"{what}: {key} padding"
            value, other = value[:rows], other[:rows]
        assert value.dtype == other.dtype and torch.equal(value, other), f"{what}: {key}"


def _save_dir(tmp_path, name):
    return str(tmp_path / f"from-{name}")


def _train_sources(tmp_path, names, flags):
    """The uninterrupted runs of ``names`` (saved at 2 and 4, the tracker put back at 2): name -> curve."""
    curves = {}
    for world in sorted({LAYOUTS[name][0] for name in names}):
        mine = [name for name in names if LAYOUTS[name][0] == world]
        runs = [(flags + LAYOUTS[name][1] + ["--save", _save_dir(tmp_path, name), "--save-interval", "2"], False)
                for name in mine]
        curves.update(zip(mine, run_on_ranks(_runs, world, runs, timeout=240)[0]))
    for name, curve in curves.items():
        assert not isinstance(curve, str), f"{name}: {curve}"
        assert [i for i, *_ in curve] == [1, 2, 3, 4], name
        with open(os.path.join(_save_dir(tmp_path, name), paths.TRACKER_FILE), "w") as f:
            f.write("2")
    return curves


def _resume_targets(tmp_path, pairs, flags):
    """Each target loads its source's iteration 2, saves it again, trains to 4: (source, target) -> curve."""
    curves = {}
    for world in sorted({LAYOUTS[target][0] for _, target in pairs}):
        mine = [pair for pair in pairs if LAYOUTS[pair[1]][0] == world]
        runs = [(flags + LAYOUTS[t][1] + ["--load", _save_dir(tmp_path, s), "--save", str(tmp_path / f"{s}-to-{t}")],
                 True) for s, t in mine]
        curves.update(zip(mine, run_on_ranks(_runs, world, runs, timeout=240)[0]))
    return curves


def test_zero3_checkpoints_reshard_in_and_out_and_continue_the_run(tmp_path):
    curves = _train_sources(tmp_path, sorted({source for source, _ in PAIRS}), FLAGS)
    for name, curve in curves.items():
        # Every layout trains (and evaluates) the same model; float32 round-off.
        assert [i for i, _, e in curve if e is not None] == [2, 4], name
        _assert_same_curve([(i, loss) for i, loss, _ in curve], [(i, loss) for i, loss, _ in curves["single"]])
        _assert_same_curve([(i, e) for i, _, e in curve if e is not None],
                           [(i, e) for i, _, e in curves["single"] if e is not None])
    resumed = _resume_targets(tmp_path, PAIRS, FLAGS)
    for (source, target), curve in resumed.items():
        assert not isinstance(curve, str), f"{source} -> {target}: {curve}"
        folder = str(tmp_path / f"{source}-to-{target}")
        assert_same_logical_state(logical_state(_save_dir(tmp_path, source), 2), logical_state(folder, 2),
                                  f"{source} -> {target}")
        _assert_same_curve([(i, loss) for i, loss, _ in curve], [(i, loss) for i, loss, _ in curves[source][2:]])
        reference, _ = merge.merge_checkpoint(_save_dir(tmp_path, source), iteration=4)
        _assert_same_params(folder, reference)


def test_bf16_fp32_masters_move_exactly_into_and_out_of_zero3(tmp_path):
    """The fp32 masters (not the bf16 parameters rounded up) and the moments: ZeRO-3's pieces are cut at
    gather units, ZeRO-1's across them, one rank's are whole."""
    flags = MODEL + ["--bf16"]
    _train_sources(tmp_path, ["dp2-zero3", "dp2-zero1"], flags)
    pairs = [("dp2-zero3", "single"), ("dp2-zero1", "dp2-zero3")]
    for pair, curve in _resume_targets(tmp_path, pairs, flags).items():
        assert not isinstance(curve, str), f"{pair}: {curve}"
    for source, target in pairs:
        saved = logical_state(_save_dir(tmp_path, source), 2)
        masters = {name: value for (name, kind), value in saved.items() if kind == "master"}
        assert masters and any(not torch.equal(value, saved[(name, "param")].float())
                               for name, value in masters.items())   # masters hold more than the bf16 params
        assert_same_logical_state(saved, logical_state(str(tmp_path / f"{source}-to-{target}"), 2),
                                  f"{source} -> {target}")


def _loaded_model(rank, world_size, argv):
    """Right after setup (which loads --load): the iteration, the whole parameters by global name, and the
    largest Adam moment this rank holds."""
    from megalite.checkpoint.index import chunk_layer_numbers, parameter_names
    from megalite.parallel import state
    from megalite.parallel.param_gather import whole_parameters
    from megalite.training.loop import setup
    run = setup(argv)
    names = parameter_names(run.model, chunk_layer_numbers(run.model, run.layer_numbers))
    with whole_parameters(run.model):
        params = {names[id(p)]: p.detach().clone() for chunk in run.model for p in chunk.parameters()}
    moments = max(float(piece.exp_avg.abs().max()) for piece in run.optimizer.all_pieces() if piece.end > piece.start)
    iteration = run.iteration
    state.destroy_grid()
    return iteration, params, moments


@pytest.mark.parametrize("source", ["single", "dp2-zero3"])
def test_finetune_into_zero3_takes_the_weights_whole_and_nothing_else(tmp_path, source):
    """--finetune: the saved layout (file for file) or another (resharded); iteration 0, fresh moments."""
    save = _save_dir(tmp_path, source)
    world, flags = LAYOUTS[source]
    run_on_ranks(_runs, world, [(MODEL + flags + ["--train-iters", "2", "--save", save], False)], timeout=120)
    loaded = run_on_ranks(_loaded_model, 2, MODEL + ZERO3 + ["--load", save, "--finetune"], timeout=120)
    saved, _ = merge.merge_checkpoint(save)
    for iteration, params, moments in loaded:
        assert iteration == 0 and moments == 0.0
        assert set(params) == set(saved) - {merge.OUTPUT_LAYER}    # tied: one logical tensor
        for name, value in params.items():
            assert torch.equal(value, saved[name]), name


def _train_and_gather(rank, world_size, argv):
    """Train (and save) under ZeRO-3; the model's whole parameters at the end, by name."""
    from megalite.parallel import state
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.parallel.param_gather import whole_parameters
    from megalite.training.loop import setup, train
    run = setup(argv)
    train(run)
    with whole_parameters(run.model):
        params = {k: v.detach().clone() for k, v in unwrap_model(run.model[0]).state_dict().items()}
    config = run.model_cfg
    state.destroy_grid()
    return params, config


def test_hugging_face_export_of_a_zero3_run_holds_its_weights(tmp_path):
    """megalite-convert --to hf on a ZeRO-3 DP2 checkpoint: the exported tensors are those of the live
    ZeRO-3 model (gathered), bit for bit, and transformers computes megalite's logits with them."""
    transformers = pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors.torch")
    from megalite.checkpoint.convert import main as convert
    from megalite.checkpoint.hf import to_hf
    from tests.checkpoint.test_hf import ATOL, COMMON, FAMILIES, _megalite_logits
    save, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    live, config = run_on_ranks(_train_and_gather, 2, COMMON + FAMILIES["llama"] + ZERO3 + ["--save", save],
                                timeout=120)[0]
    assert convert(["--to", "hf", "--load", save, "--save", hf]) == 0
    exported = safetensors.load_file(os.path.join(hf, "model.safetensors"))
    _, expected = to_hf(live, config)
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = run_on_ranks(_megalite_logits, 1, save, tokens, [], timeout=120)[0][..., :100]
    torch.testing.assert_close(model(tokens).logits, ours, rtol=0, atol=ATOL)


def test_zero1_and_zero2_save_one_layout_and_zero3_another():
    """ZeRO-1 and ZeRO-2 cut the same optimizer pieces, so either loads the other's files as they are;
    ZeRO-3 cuts its buckets at gather units: a reshard, named as such in its message."""
    from types import SimpleNamespace

    from megalite.checkpoint.reshard import describe_layout
    from megalite.checkpoint.save_load import saved_layout
    grid = SimpleNamespace(tp_size=1, pp_size=1, virtual_pp_size=None, cp_size=1, dp_size=2, ep_size=1)
    layouts = {strategy: saved_layout(grid, strategy) for strategy in ("optim", "optim_grads", "optim_grads_params")}
    assert layouts["optim"] == layouts["optim_grads"] != layouts["optim_grads_params"]
    assert describe_layout(layouts["optim_grads_params"]).endswith("DP=2 ZeRO-3")
    assert describe_layout(layouts["optim"]).endswith("DP=2 ZeRO-1/2")
    assert describe_layout(saved_layout(grid, False)).endswith("DP=2 no ZeRO")


def _state_dicts_of_zero3(rank, world_size, argv):
    """The model's state dict asked for outside whole_parameters (the error), then inside (the shapes)."""
    from megalite.parallel import state
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.parallel.param_gather import whole_parameters
    from megalite.training.loop import setup, train
    run = setup(argv)
    train(run)                      # a step, an evaluation and a save: the parameters are dropped after each
    try:
        unwrap_model(run.model[0]).state_dict()
        refused = None
    except RuntimeError as error:
        refused = str(error)
    with whole_parameters(run.model):
        shapes = {k: tuple(v.shape) for k, v in run.model[0].state_dict().items()}
    state.destroy_grid()
    return refused, shapes


def test_a_zero3_state_dict_outside_whole_parameters_is_refused_not_empty(tmp_path):
    argv = FLAGS + ZERO3 + ["--train-iters", "1", "--eval-interval", "1", "--save", str(tmp_path / "ckpt")]
    for refused, shapes in run_on_ranks(_state_dicts_of_zero3, 2, argv, timeout=120):
        assert refused is not None and "read it inside megalite.parallel.param_gather.whole_parameters" in refused
        assert shapes["embedding.word_embeddings.weight"] == (64, 32) and all(map(math.prod, shapes.values()))
