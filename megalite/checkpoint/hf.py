"""Hugging Face in and out: megalite checkpoints as ``config.json`` + ``model.safetensors`` (+ the
tokenizer's files) that ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load,
and back.

    megalite-convert --to hf --load CKPT --save HF_DIR       (any TP x PP layout)
    megalite-convert --from hf --load HF_DIR --save CKPT     (a TP=1, PP=1 checkpoint)

(``tools/convert_checkpoint.py`` and ``python -m megalite.checkpoint.hf`` are the same command.)

The families and the fields carried or refused: ``hf_config.py``; the tensors: ``hf_tensors.py``; the
mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): ``hf_moe.py``; the tokenizer files:
``hf_tokenizer.py``.  Nothing is converted silently: a config field that changes the
math and that megalite does not implement, or a tensor it would not use, is refused with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Tuple

import torch

from megalite.checkpoint.hf_config import (
    as_hf_config,
    config_from_hf,
    export_family,
    hf_config_dict,
    require_transformers,
)
from megalite.checkpoint.hf_tensors import TensorSource, from_hf_tensors, to_hf_tensors
from megalite.checkpoint.hf_tokenizer import plan_tokenizer, write_tokenizer
from megalite.checkpoint.imported import save_one_rank
from megalite.config.settings import ModelConfig

__all__ = ["to_hf", "from_hf", "export_checkpoint", "import_checkpoint", "main"]

Tensors = Dict[str, torch.Tensor]


def to_hf(state: Tensors, config: ModelConfig) -> Tuple[dict, Tensors]:
    """(config.json dict, state dict) of the Hugging Face model equal to megalite's single-rank ``state``."""
    family = export_family(config)
    return hf_config_dict(config, family), to_hf_tensors(state, config, family)


def from_hf(hf_config, hf: Tensors) -> Tuple[ModelConfig, Tensors]:
    """megalite's (ModelConfig, single-rank state dict) equal to a Hugging Face model: ``hf_config`` is a
    transformers config (or a config.json dict), ``hf`` its state dict, every tensor of which is used."""
    hf_config = as_hf_config(hf_config)
    config = config_from_hf(hf_config)
    family = hf_config.model_type if hf_config.model_type in ("gpt2", "gpt_neox") else "llama"
    return config, from_hf_tensors(TensorSource(hf), config, family)


def export_checkpoint(load: str, save: str, tokenizer: bool = True) -> str:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) of the newest iteration of a
    megalite checkpoint.  Everything is converted and checked before the first file is written."""
    from safetensors.torch import save_file

    from megalite.checkpoint.merge import merge_checkpoint
    state, settings = merge_checkpoint(load)
    config = ModelConfig.from_saved(settings["model"])
    hf_config, tensors = to_hf(state, config)
    plan = plan_tokenizer(settings.get("data", {}), config.max_position_embeddings) if tokenizer else None
    os.makedirs(save, exist_ok=True)
    save_file(tensors, os.path.join(save, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if plan is not None:
        write_tokenizer(plan, save)
        print(plan.note)
    return save


def _read_hf(folder: str) -> Tuple[object, Tensors]:
    """(the transformers config as ``AutoConfig`` resolves it, every tensor of the folder's safetensors files)."""
    from safetensors.torch import load_file

    transformers = require_transformers()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json (a Hugging Face model folder has one)")
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors file (only safetensors checkpoints are read)")
    tensors: Tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    return hf_config, tensors


def import_checkpoint(load: str, save: str) -> str:
    """Write a TP=1, PP=1 megalite checkpoint (weights and model settings) of a Hugging Face folder."""
    config, tensors = from_hf(*_read_hf(load))
    save_one_rank(config, tensors, save)
    return save


def main(argv=None, prog: str = "megalite-convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="export a megalite checkpoint to Hugging Face")
    direction.add_argument("--from", dest="source", choices=["hf"], help="import a Hugging Face model")
    parser.add_argument("--load", required=True, help="the folder to read")
    parser.add_argument("--save", required=True, help="the folder to write")
    parser.add_argument("--skip-tokenizer", action="store_true", help="with --to hf: write no tokenizer files")
    args = parser.parse_args(argv)
    try:
        written = (export_checkpoint(args.load, args.save, tokenizer=not args.skip_tokenizer) if args.to
                   else import_checkpoint(args.load, args.save))
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.checkpoint.hf"))
