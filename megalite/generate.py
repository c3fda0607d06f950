"""Sample text from a megalite checkpoint, on one process (shards of any TP x PP layout are merged).

    megalite-generate --load runs/quickstart/checkpoints --prompt "def " --max-new-tokens 200

The checkpoint holds the run's settings (model shape, tokenizer), so only the folder is needed.
Tensor-parallel shards are concatenated along each parameter's partition dimension (stored in the
checkpoint): initialization and training keep every shard the exact slice of the full weight, so
the concatenation is the TP=1 parameter.  Pipeline stages hold disjoint layers, each under its
global layer number.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Dict, List, Optional

import torch

from megalite import checkpoint
from megalite.config import DataConfig, ModelConfig
from megalite.data.training_data import tokenizer_from_config
from megalite.model.gpt import GPTModel

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _globalize(name: str, layer_numbers: Optional[List[int]]) -> str:
    """Rename a chunk-local layer index to its global number (a no-op when the model names layers globally)."""
    if layer_numbers is None:
        return name
    match = _LAYER.search(name)
    if match is None:
        return name
    local = int(match.group(2))
    if local >= len(layer_numbers) or layer_numbers == list(range(len(layer_numbers))):
        return name
    return name[:match.start(2)] + str(layer_numbers[local]) + name[match.end(2):]


VOCAB_ROWS = ("word_embeddings.weight", "output_layer.weight")   # [padded_vocab, h] in GPTModel


def merge_checkpoint(root: str, iteration: Optional[int] = None):
    """The full model's state dict and the run's settings, from every (tp, pp) shard of a checkpoint."""
    iteration = checkpoint.read_latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"no {checkpoint.TRACKER_FILE} under {root}; train with --save {root} first")
    folder = checkpoint.iteration_dir(root, iteration)
    shards = sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_"))
    by_name: Dict[str, Dict[int, torch.Tensor]] = {}
    dims: Dict[str, Optional[int]] = {}
    settings = None
    for shard in shards:
        tp_rank = int(shard.split("_")[2])
        state = torch.load(os.path.join(folder, shard, "model_optim_rng.pt"), map_location="cpu", weights_only=True)
        settings = state["settings"]
        chunk_keys = sorted((k for k in state if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
        for index, key in enumerate(chunk_keys):
            layer_numbers = state["layer_numbers"][index] if state.get("layer_numbers") else None
            partition = state["partition_dims"][index]
            for name, tensor in state[key].items():
                full_name = _globalize(name, layer_numbers)
                by_name.setdefault(full_name, {})[tp_rank] = tensor
                dims[full_name] = partition.get(name)
    merged = {}
    for name, parts in by_name.items():
        ordered = [parts[r] for r in sorted(parts)]
        dim = dims.get(name)
        merged[name] = torch.cat(ordered, dim=dim) if dim is not None and len(ordered) > 1 else ordered[0]
    # The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP, so a TP=2 run has
    # more (all-zero) padding rows than the one-rank model: keep the rows a TP=1 model has.
    saved = ModelConfig(**settings["model"])
    single = dataclasses.replace(saved, tensor_model_parallel_size=1, sequence_parallel=False)
    for name, tensor in merged.items():
        if name.endswith(VOCAB_ROWS) and tensor.shape[0] != single.padded_vocab_size:
            merged[name] = tensor[:single.padded_vocab_size].clone()
    return merged, settings


def load_model(root: str, iteration: Optional[int] = None, device: str = "cpu"):
    """(model, settings): a TP=1, one-stage GPTModel holding the checkpoint's weights, in eval mode."""
    state, settings = merge_checkpoint(root, iteration)
    fields = dict(settings["model"], tensor_model_parallel_size=1, sequence_parallel=False,
                  recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    config = ModelConfig(**fields)
    model = GPTModel(config, pre_process=True, post_process=True, layer_numbers=list(range(config.num_layers)))
    # The last stage's copy of a tied embedding duplicates the first stage's word embedding.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), settings


@torch.no_grad()
def sample(model, config: ModelConfig, prompt_ids: List[int], max_new_tokens: int, vocab_size: int,
           temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0) -> List[int]:
    """Autoregressive sampling; returns prompt + new token ids.  Padding ids (>= vocab_size) are never drawn."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = ids[-config.seq_length:]
        tokens = torch.tensor([window], dtype=torch.long, device=device)
        positions = torch.arange(len(window), device=device).unsqueeze(0)
        logits = model(tokens, positions)[-1, 0, :vocab_size].float().cpu()   # logits: [s, b, v]
        if temperature <= 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k:
            threshold = torch.topk(logits, min(top_k, vocab_size)).values[-1]
            logits[logits < threshold] = -float("inf")
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return ids


def prompt_to_ids(prompt: str, tokenizer, vocab_size: int) -> List[int]:
    """The prompt's token ids: encoded by the run's tokenizer, or given as ids when it had none."""
    if tokenizer is not None:
        return tokenizer.encode(prompt) if prompt else [tokenizer.eod]
    try:
        ids = [int(t) for t in prompt.split()] or [0]
    except ValueError:
        raise ValueError(f"--prompt {prompt!r}: this checkpoint has no tokenizer, so the prompt is token ids "
                         f"separated by spaces") from None
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"--prompt token id {outside[0]} is outside the vocabulary of {vocab_size} ids "
                         f"(0 to {vocab_size - 1})")
    return ids


def main(argv=None, prog: str = "megalite-generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint folder (the --save of training)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, settings = load_model(args.load, args.iteration)
        data = DataConfig(**dict(settings["data"], mock_data=True))  # the tokenizer fields only
        tokenizer = tokenizer_from_config(data, settings["model"]["vocab_size"])
        prompt_ids = prompt_to_ids(args.prompt, tokenizer, settings["model"]["vocab_size"])
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    config = ModelConfig(**dict(settings["model"], tensor_model_parallel_size=1, sequence_parallel=False))
    ids = sample(model, config, prompt_ids, args.max_new_tokens, settings["model"]["vocab_size"],
                 args.temperature, args.top_k, args.seed)
    print(tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.generate"))
