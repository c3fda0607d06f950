"""Megatron-LM checkpoints in and out: the legacy ``torch`` format written and read here, the
``torch_dist`` format through megatron_dist.py (docs/megatron.md).

    megalite-convert --to megatron --load CKPT --save MEGATRON_DIR [--ckpt-format torch|torch_dist]
                     [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--megatron-spec local|te]
                     [--expert-model-parallel-size E] [--moe-grouped-gemm]
    megalite-convert --from megatron --load MEGATRON_DIR --save CKPT     (either format, any TP x PP (x EP))

The legacy format is Megatron-LM's folder layout with one ``torch.save`` file per model-parallel rank::

    latest_checkpointed_iteration.txt
    iter_0000100/mp_rank_00/model_optim_rng.pt           (PP = 1)
    iter_0000100/mp_rank_01_002/model_optim_rng.pt       (TP rank 1, PP rank 2)
    iter_0000100/mp_rank_01_002_003/model_optim_rng.pt   (TP rank 1, PP rank 2, EP rank 3)
    iter_0000100/mp_rank_01_003/model_optim_rng.pt       (TP rank 1, EP rank 3 when PP = 1: the args tell)

each file a dict ``{"args", "checkpoint_version", "iteration", "model"}`` whose ``model`` is that rank's
megatron-core state dict: layers numbered from 0 within the stage, TP shards as megatron_names.py
splits them; under EP each file holds its EP rank's experts under local indices (megatron_experts.py)
and every other tensor.  An export writes every (TP, EP) pair of ranks; Megatron-LM at TP > 1 with expert
TP 1 saves only the pairs its ranks hold, and an import reads any set that holds each TP rank and each EP
rank of every stage.  Only weights cross: Megatron's optimizer state is laid out by its own (distributed)
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
from megalite.checkpoint.megatron_experts import expert_index, join_from_ep, split_for_ep
from megalite.checkpoint.megatron_legacy_model import from_legacy_model, is_legacy_model, to_legacy_model
from megalite.checkpoint.megatron_names import from_megatron, join_from_tp, split_for_tp, to_megatron
from megalite.checkpoint.paths import TRACKER_FILE, iteration_dir, read_latest_iteration
from megalite.config.settings import ModelConfig

__all__ = ["FORMATS", "export_megatron", "import_megatron", "write_legacy", "read_legacy", "megatron_rank_dir"]

Tensors = Dict[str, torch.Tensor]
FORMATS = ("torch", "torch_dist")
MODEL_FILE = "model_optim_rng.pt"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")
# megatron-core's linears (dense, shared and routed experts, grouped or not) have an ``_extra_state`` entry in
# their state dict (None unless Transformer Engine keeps FP8 metadata in it): present in Megatron's files, so a
# strict load expects them.
_LINEAR = re.compile(r"^(decoder\.layers\.\d+\..*linear_(?:qkv|proj|fc1|fc2))\.weight\d*$")


def megatron_rank_dir(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0,
                      ep: int = 1) -> str:
    """Megatron-LM's shard folder: ``mp_rank_TT``, then ``_PPP`` when there are several pipeline stages, then
    ``_EEE`` when there are several expert-parallel ranks."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")
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
    extras = sorted({match.group(1) + "._extra_state" for match in map(_LINEAR.match, out) if match})
    if spec == "te":
        extras += [f"decoder.layers.{i}.self_attention.core_attention._extra_state" for i in range(per_stage)]
    if last:
        extras.append("output_layer._extra_state")
    out.update(dict.fromkeys(extras))
    return out


def write_legacy(state: Tensors, config: ModelConfig, root: str, *, tp: int, pp: int, iteration: int,
                 spec: str, legacy_models: bool = False, tokenizer_type: str = "NullTokenizer", ep: int = 1,
                 grouped: bool = False) -> str:
    """Write a global megatron-core ``state`` as Megatron-LM's legacy ``torch`` checkpoint at ``tp`` x ``pp``
    (x ``ep`` for the experts, in TEGroupedMLP's layout when ``grouped``); ``legacy_models``: in the layout of
    Megatron-LM's model before megatron-core (megatron_legacy_model.py)."""
    if legacy_models and (spec != "local" or config.num_experts):
        raise ValueError("--use-legacy-models writes the model before megatron-core, which has no Transformer "
                         "Engine names and no experts: drop --megatron-spec te, or --use-legacy-models")
    if config.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {config.num_layers}; "
                         f"Megatron-LM splits layers evenly across stages")
    _check_experts(config, "torch", spec, ep, grouped)
    if ep > 1 and config.num_experts % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} does not divide the model's {config.num_experts} "
                         f"experts; choose a divisor of the expert count")
    config.check_tensor_parallel(tp)
    dtype = state["embedding.word_embeddings.weight"].dtype
    args = megatron_args(config, tp=tp, pp=pp, iteration=iteration, spec=spec, ckpt_format="torch", dtype=dtype,
                         legacy_models=legacy_models, tokenizer_type=tokenizer_type, ep=ep, grouped=grouped)
    tied = not config.untie_embeddings_and_output_weights
    for stage in range(pp):
        staged = _stage_state(state, config, stage, pp, spec)
        for ep_rank, share in enumerate(split_for_ep(staged, config.num_experts, ep) if ep > 1 else [staged]):
            shards = {name: None if tensor is None else split_for_tp(name, tensor, tp, config.swiglu)
                      for name, tensor in share.items()}       # each tensor split once, not once per TP rank
            for rank in range(tp):
                model = {name: None if pieces is None else pieces[rank].clone() for name, pieces in shards.items()}
                if legacy_models:
                    model = to_legacy_model(model, tied)
                folder = megatron_rank_dir(root, iteration, rank, stage, pp, ep_rank, ep)
                os.makedirs(folder, exist_ok=True)
                torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                            "model": model, "num_floating_point_operations_so_far": 0},
                           os.path.join(folder, MODEL_FILE))
    _write_tracker(root, iteration)
    return iteration_dir(root, iteration)


def _write_tracker(root: str, iteration: int) -> None:
    with open(os.path.join(root, TRACKER_FILE), "w") as f:
        f.write(str(iteration))


def _rank_files(folder: str) -> Dict[Tuple[int, int, int], dict]:
    """Every ``mp_rank_*`` file of a legacy iteration folder by (TP rank, PP rank, EP rank), loaded.  A
    folder name with one suffix is ``_PPP`` or ``_EEE``: the args say which of PP and EP is above 1."""
    found = {}
    for name in os.listdir(folder):
        match = _RANK_DIR.match(name)
        if match and os.path.isfile(os.path.join(folder, name, MODEL_FILE)):
            found[name] = (int(match.group(1)), [int(part) for part in match.group(2).split("_")[1:]])
    if not found:
        raise FileNotFoundError(f"{folder} holds no mp_rank_*/{MODEL_FILE}; it is not a Megatron-LM legacy checkpoint")
    # Megatron's own checkpoints pickle an argparse.Namespace: read only checkpoints you trust.
    files = {name: torch.load(os.path.join(folder, name, MODEL_FILE), map_location="cpu", weights_only=False,
                              mmap=True) for name in found}
    args = next(iter(files.values())).get("args")
    pp_on = (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1
    ep_on = (getattr(args, "expert_model_parallel_size", 1) or 1) > 1
    ranks = {}
    for name, (tp_rank, suffix) in found.items():
        if len(suffix) != pp_on + ep_on:
            raise ValueError(f"{folder}/{name}: its args say PP {'>' if pp_on else '='} 1 and EP "
                             f"{'>' if ep_on else '='} 1, which name mp_rank_TT{'_PPP' * pp_on}{'_EEE' * ep_on}")
        ranks[(tp_rank, suffix[0] if pp_on else 0, suffix[-1] if ep_on else 0)] = files[name]
    return ranks


def _stage_files(ranks: dict, folder: str, stage: int, tp: int, ep: int) -> Tuple[list, list]:
    """(a file of each TP rank, a file of each EP rank) of pipeline stage ``stage``."""
    def pick(key, size):
        chosen = []
        for index in range(size):
            held = sorted(k for k in ranks if k[1] == stage and k[key] == index)
            if not held:
                raise FileNotFoundError(f"{folder} lacks the files of {('TP', 'PP', 'EP')[key]} rank {index} of "
                                        f"pipeline stage {stage}")
            chosen.append(ranks[held[0]]["model"])
        return chosen
    return pick(0, tp), pick(2, ep)


def read_legacy(folder: str) -> Tuple[Tensors, object]:
    """(global megatron-core state, args) of a legacy iteration folder of any TP x PP x EP."""
    ranks = _rank_files(folder)
    first = ranks[min(ranks)]
    args = first.get("args")
    # The sizes the args name (a missing file is then named), else those the folder names show.
    tp, pp, ep = (getattr(args, f"{kind}_model_parallel_size", None) or max(key[i] for key in ranks) + 1
                  for i, kind in enumerate(("tensor", "pipeline", "expert")))
    if any(key.startswith("model") and key != "model" for key in first):
        raise ValueError(f"{folder}: a virtual-pipeline checkpoint (model0, model1, ...) is not supported; "
                         f"convert it with Megatron-LM's tools/checkpoint to --virtual-pipeline-model-parallel-size 1")
    config = config_from_args(args)
    for saved in ranks.values():
        if is_legacy_model(saved["model"]):
            saved["model"] = from_legacy_model(saved["model"], not config.untie_embeddings_and_output_weights)
    state: Tensors = {}
    offset = 0
    for stage in range(pp):
        stage_models, expert_models = _stage_files(ranks, folder, stage, tp, ep)
        stage_state = join_from_ep(expert_models)           # experts whole on every TP rank (expert TP 1)
        for local, first_shard in stage_models[0].items():
            if first_shard is not None and not local.endswith("_extra_state") and expert_index(local) is None:
                stage_state[local] = join_from_tp(local, [model[local] for model in stage_models], config.swiglu)
        layers = set()
        for local, tensor in stage_state.items():
            name, match = local, _LAYER.match(local)
            if match:
                layers.add(int(match.group(1)))
                name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
            elif local == "output_layer.weight" and not config.untie_embeddings_and_output_weights:
                continue                                # the last stage's copy of the tied embedding
            if not local.endswith("_extra_state"):
                state[name] = tensor
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


def _check_experts(config: ModelConfig, ckpt_format: str, spec: str, ep: int, grouped: bool) -> None:
    """The export's expert flags against the model; what Megatron-LM cannot hold refused in one line."""
    if not config.num_experts:
        if ep > 1 or grouped:
            raise ValueError(f"--expert-model-parallel-size {ep} / --moe-grouped-gemm describe experts, which this "
                             f"model has none of; drop them")
        return
    if ckpt_format != "torch":
        raise ValueError(f"experts in --ckpt-format {ckpt_format} are not written yet; use --ckpt-format torch "
                         f"(Megatron-LM's --ckpt-convert-format torch_dist converts it)")
    if grouped and spec != "te":
        raise ValueError("--moe-grouped-gemm writes TEGroupedMLP's names, a Transformer Engine module: add "
                         "--megatron-spec te")
    if config.moe_shared_expert_intermediate_size and config.add_bias_linear:
        raise ValueError("megatron-core's shared experts have no biases, and this model's shared expert has: "
                         "export it only from a model trained with --disable-bias-linear")


def export_megatron(load: str, save: str, *, ckpt_format: str = "torch", tp: int = 1, pp: int = 1,
                    spec: str = "local", legacy_models: bool = False, ep: int = 1, grouped: bool = False) -> str:
    """Write the newest iteration of a megalite checkpoint (any layout) as a Megatron-LM checkpoint (its
    experts over ``ep`` ranks, in TEGroupedMLP's layout when ``grouped``)."""
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
    _check_experts(config, ckpt_format, spec, ep, grouped)
    state = to_megatron(merged, config, spec, padded_vocab=config.padded_vocab_size(tp),
                        experts="grouped" if grouped else "sequential")
    os.makedirs(save, exist_ok=True)
    if ckpt_format == "torch":
        tokenizer = (settings.get("data") or {}).get("tokenizer_type") or "NullTokenizer"
        return write_legacy(state, config, save, tp=tp, pp=pp, iteration=iteration, spec=spec,
                            legacy_models=legacy_models, tokenizer_type=tokenizer, ep=ep, grouped=grouped)
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
