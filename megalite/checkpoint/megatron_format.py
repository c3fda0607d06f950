"""Megatron-LM checkpoints in and out: the legacy ``torch`` format written and read here, the
``torch_dist`` format through megatron_dist.py (docs/megatron.md).

    megalite-convert --to megatron --load CKPT --save MEGATRON_DIR [--ckpt-format torch|torch_dist]
                     [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--megatron-spec local|te]
    megalite-convert --from megatron --load MEGATRON_DIR --save CKPT     (either format, any TP x PP)

The legacy format is Megatron-LM's folder layout with one ``torch.save`` file per model-parallel rank::

    latest_checkpointed_iteration.txt
    iter_0000100/mp_rank_00/model_optim_rng.pt           (PP = 1)
    iter_0000100/mp_rank_01_002/model_optim_rng.pt       (TP rank 1, PP rank 2)

each file a dict ``{"args", "checkpoint_version", "iteration", "model"}`` whose ``model`` is that rank's
megatron-core state dict: layers numbered from 0 within the stage, TP shards as megatron_names.py
splits them.  Only weights cross: Megatron's optimizer state is laid out by its own (distributed)
optimizer's buffers, so an export carries none (load it with ``--no-load-optim --no-load-rng``, or
``--finetune``) and an import starts megalite's optimizer fresh.

Both directions go through one global view: megalite's side is its own full state dict
(merge.merge_checkpoint, from any megalite layout), Megatron's side the global megatron-core state
(megatron_names.py); an import is saved as a TP=1, PP=1 megalite checkpoint that megalite's
resharding loads into any layout.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import torch

from megalite.checkpoint import megatron_dist
from megalite.checkpoint.imported import save_one_rank
from megalite.checkpoint.megatron_args import CHECKPOINT_VERSION, config_from_args, megatron_args
from megalite.checkpoint.megatron_legacy_model import from_legacy_model, is_legacy_model, to_legacy_model
from megalite.checkpoint.megatron_names import from_megatron, join_from_tp, split_for_tp, to_megatron
from megalite.checkpoint.paths import TRACKER_FILE, iteration_dir, read_latest_iteration
from megalite.config.settings import ModelConfig

__all__ = ["FORMATS", "export_megatron", "import_megatron", "write_legacy", "read_legacy", "megatron_rank_dir"]

Tensors = Dict[str, torch.Tensor]
FORMATS = ("torch", "torch_dist")
MODEL_FILE = "model_optim_rng.pt"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
# megatron-core modules with an ``_extra_state`` entry in their state dict (None unless Transformer Engine
# keeps FP8 metadata in it): present in Megatron's files, so a strict load expects them.
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def megatron_rank_dir(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's shard folder: ``mp_rank_TT`` when there is one pipeline stage, else ``mp_rank_TT_PPP``."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return os.path.join(iteration_dir(root, iteration), name)


def _stage_state(state: Tensors, config: ModelConfig, stage: int, pp: int, spec: str) -> Tensors:
    """Pipeline stage ``stage``'s share of a global state, its layers numbered from 0."""
    per_stage = config.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    out: Tensors = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            layer = int(match.group(1)) - stage * per_stage
            if 0 <= layer < per_stage:
                out[f"decoder.layers.{layer}.{match.group(2)}"] = tensor
        elif name.startswith("embedding."):
            if first:
                out[name] = tensor
        elif last:                                      # final norm, output layer
            out[name] = tensor
    if last and pp > 1 and not config.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = state["embedding.word_embeddings.weight"]   # the last stage's tied copy
    extras = [f"decoder.layers.{i}.{module}._extra_state" for i in range(per_stage) for module in _LINEARS]
    if spec == "te":
        extras += [f"decoder.layers.{i}.self_attention.core_attention._extra_state" for i in range(per_stage)]
    if last:
        extras.append("output_layer._extra_state")
    out.update(dict.fromkeys(extras))
    return out


def write_legacy(state: Tensors, config: ModelConfig, root: str, *, tp: int, pp: int, iteration: int,
                 spec: str, legacy_models: bool = False, tokenizer_type: str = "NullTokenizer") -> str:
    """Write a global megatron-core ``state`` as Megatron-LM's legacy ``torch`` checkpoint at ``tp`` x ``pp``;
    ``legacy_models``: in the layout of Megatron-LM's model before megatron-core (megatron_legacy_model.py)."""
    if legacy_models and spec != "local":
        raise ValueError("--use-legacy-models writes the model before megatron-core, which has no Transformer "
                         "Engine names: drop --megatron-spec te")
    if config.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {config.num_layers}; "
                         f"Megatron-LM splits layers evenly across stages")
    config.check_tensor_parallel(tp)
    dtype = state["embedding.word_embeddings.weight"].dtype
    args = megatron_args(config, tp=tp, pp=pp, iteration=iteration, spec=spec, ckpt_format="torch", dtype=dtype,
                         legacy_models=legacy_models, tokenizer_type=tokenizer_type)
    tied = not config.untie_embeddings_and_output_weights
    for stage in range(pp):
        staged = _stage_state(state, config, stage, pp, spec)
        for rank in range(tp):
            model = {name: (None if tensor is None else
                            split_for_tp(name, tensor, tp, config.swiglu)[rank].clone())
                     for name, tensor in staged.items()}
            if legacy_models:
                model = to_legacy_model(model, tied)
            folder = megatron_rank_dir(root, iteration, rank, stage, pp)
            os.makedirs(folder, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                        "model": model, "num_floating_point_operations_so_far": 0},
                       os.path.join(folder, MODEL_FILE))
    _write_tracker(root, iteration)
    return iteration_dir(root, iteration)


def _write_tracker(root: str, iteration: int) -> None:
    with open(os.path.join(root, TRACKER_FILE), "w") as f:
        f.write(str(iteration))


def read_legacy(folder: str) -> Tuple[Tensors, object]:
    """(global megatron-core state, args) of a legacy iteration folder of any TP x PP."""
    ranks = {}
    for name in os.listdir(folder):
        match = _RANK_DIR.match(name)
        if match and os.path.isfile(os.path.join(folder, name, MODEL_FILE)):
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = os.path.join(folder, name, MODEL_FILE)
    if not ranks:
        raise FileNotFoundError(f"{folder} holds no mp_rank_*/{MODEL_FILE}; it is not a Megatron-LM legacy checkpoint")
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the shards of (TP rank, PP rank) {missing[:4]}")
    # Megatron's own checkpoints pickle an argparse.Namespace: read only checkpoints you trust.
    files = {key: torch.load(path, map_location="cpu", weights_only=False, mmap=True) for key, path in ranks.items()}
    args = files[(0, 0)].get("args")
    if any(key.startswith("model") and key != "model" for key in files[(0, 0)]):
        raise ValueError(f"{folder}: a virtual-pipeline checkpoint (model0, model1, ...) is not supported; "
                         f"convert it with Megatron-LM's tools/checkpoint to --virtual-pipeline-model-parallel-size 1")
    config = config_from_args(args)
    for saved in files.values():
        if is_legacy_model(saved["model"]):
            saved["model"] = from_legacy_model(saved["model"], not config.untie_embeddings_and_output_weights)
    state: Tensors = {}
    offset = 0
    for stage in range(pp):
        stage_models = [files[(rank, stage)]["model"] for rank in range(tp)]
        layers = set()
        for local, first in stage_models[0].items():
            if first is None or local.endswith("_extra_state"):
                continue
            name, match = local, _LAYER.match(local)
            if match:
                layers.add(int(match.group(1)))
                name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
            elif local == "output_layer.weight" and not config.untie_embeddings_and_output_weights:
                continue                                # the last stage's copy of the tied embedding
            state[name] = join_from_tp(name, [model[local] for model in stage_models], config.swiglu)
        offset += len(layers)
    return state, args


def _iteration_folder(root: str) -> Tuple[str, int]:
    """The folder and iteration that Megatron's tracker file names (``release`` included)."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise FileNotFoundError(f"{root} has no {TRACKER_FILE}; point --load at a Megatron-LM checkpoint root")
    with open(tracker, "rb") as f:
        if f.read().decode("utf-8", errors="replace").strip() == "release":
            return os.path.join(root, "release"), 0
    iteration = read_latest_iteration(root)     # ASCII digits, or one line naming what the file holds
    return iteration_dir(root, iteration), iteration


def export_megatron(load: str, save: str, *, ckpt_format: str = "torch", tp: int = 1, pp: int = 1,
                    spec: str = "local", legacy_models: bool = False) -> str:
    """Write the newest iteration of a megalite checkpoint (any layout) as a Megatron-LM checkpoint."""
    from megalite.checkpoint.merge import merge_checkpoint
    from megalite.checkpoint.reader import CheckpointReader

    if ckpt_format not in FORMATS:
        raise ValueError(f"--ckpt-format {ckpt_format}: choose one of {', '.join(FORMATS)}")
    if legacy_models and ckpt_format != "torch":
        raise ValueError(f"--use-legacy-models is written in --ckpt-format torch only, not {ckpt_format}")
    iteration = CheckpointReader(load).iteration
    if os.path.exists(iteration_dir(save, iteration)):
        raise ValueError(f"{iteration_dir(save, iteration)} exists; give --save a folder without that iteration "
                         f"(files of another layout would mix with the new ones)")
    merged, settings = merge_checkpoint(load)
    config = ModelConfig.from_saved(settings["model"])
    state = to_megatron(merged, config, spec, padded_vocab=config.padded_vocab_size(tp))
    os.makedirs(save, exist_ok=True)
    if ckpt_format == "torch":
        tokenizer = (settings.get("data") or {}).get("tokenizer_type") or "NullTokenizer"
        return write_legacy(state, config, save, tp=tp, pp=pp, iteration=iteration, spec=spec,
                            legacy_models=legacy_models, tokenizer_type=tokenizer)
    args = megatron_args(config, tp=tp, pp=pp, iteration=iteration, spec=spec, ckpt_format=ckpt_format,
                         dtype=state["embedding.word_embeddings.weight"].dtype)
    folder = megatron_dist.write_dist(state, iteration_dir(save, iteration), args=args, iteration=iteration)
    _write_tracker(save, iteration)
    return folder


def import_megatron(load: str, save: str) -> str:
    """Write a TP=1, PP=1 megalite checkpoint (weights and model settings, iteration 0) of the newest
    iteration of a Megatron-LM checkpoint in either format."""
    folder, _ = _iteration_folder(load)
    if megatron_dist.is_dist_checkpoint(folder):
        state, args = megatron_dist.read_dist(folder)
    else:
        state, args = read_legacy(folder)
    config = config_from_args(args)
    save_one_rank(config, from_megatron(state, config), save)
    return save
