"""Sample text from a megalite checkpoint, on one process (shards of any TP x PP layout are merged).

megalite/checkpoint/merge.py does the merging.

    megalite-generate --load runs/quickstart/checkpoints --prompt "def " --max-new-tokens 200

The checkpoint holds the run's settings (model shape, tokenizer), so only the folder is needed.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch

from megalite.checkpoint.merge import load_model
from megalite.config.settings import DataConfig, ModelConfig
from megalite.data.training_data import tokenizer_from_config


@torch.no_grad()
def sample(model, config: ModelConfig, prompt_ids: List[int], max_new_tokens: int, vocab_size: int,
           temperature: float = 0.8, top_k: Optional[int] = 40, seed: int = 0, top_p: float = 1.0) -> List[int]:
    """Autoregressive sampling; returns prompt + new token ids.  Padding ids (>= vocab_size) are never drawn.

    ``temperature`` 0 is greedy; ``top_k`` (0: off) keeps the k likeliest ids, ``top_p`` (1: off) the
    likeliest ids whose probabilities add up to at least p (nucleus sampling), as Megatron's flags do."""
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
        # In float64 a tiny temperature still gives finite logits (fp32 would overflow to inf, then NaN).
        probs = torch.softmax(_filtered(logits.double() / temperature, top_k, top_p), -1)
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids


def _filtered(logits: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    """The logits with every id outside the top-k and the top-p nucleus set to -inf."""
    if top_k:
        threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        before = torch.softmax(ordered, -1).cumsum(-1) - torch.softmax(ordered, -1)   # mass of the likelier ids
        logits = logits.clone()
        logits[order[before >= top_p]] = -float("inf")          # the first id is always kept
    return logits


def prompt_to_ids(prompt: str, tokenizer, vocab_size: int) -> List[int]:
    """The prompt's token ids: encoded by the run's tokenizer, or given as ids when it had none; an empty
    prompt starts from the end-of-document token.  Every id must be one the model has."""
    if tokenizer is not None:
        ids = tokenizer.encode(prompt) if prompt.strip() else []
        ids, what = (ids, "token id") if ids else ([tokenizer.eod], "end-of-document id (an empty prompt starts there)")
    else:
        try:
            ids, what = [int(t) for t in prompt.split()] or [0], "token id"
        except ValueError:
            raise ValueError(f"--prompt {prompt!r}: this checkpoint has no tokenizer, so the prompt is token ids "
                             f"separated by spaces") from None
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"--prompt: {what} {outside[0]} is outside the model's vocabulary of {vocab_size} ids "
                         f"(0 to {vocab_size - 1}); give a prompt the model's tokenizer encodes within it")
    return ids


def saved_data_config(root: str, settings: dict) -> DataConfig:
    """The run's data settings, for their tokenizer fields only (the data itself is not opened)."""
    try:
        return DataConfig(**dict(settings.get("data") or {}, mock_data=True))
    except TypeError as error:      # a field this megalite does not know
        raise ValueError(f"--load {root}: its data settings do not fit this megalite ({error})") from None


def check_sampling(args) -> None:
    """The sampling flags' ranges, one line each (NaN fails every comparison, so it is named first)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    for flag, value in (("--top-k", args.top_k), ("--max-new-tokens", args.max_new_tokens)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")


def main(argv=None, prog: str = "megalite-generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint folder (the --save of training)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40, help="keep the k likeliest ids (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest ids whose probabilities add "
                        "up to p (nucleus sampling; 1: off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_sampling(args)
        model, settings = load_model(args.load, args.iteration)
        data = saved_data_config(args.load, settings)
        tokenizer = tokenizer_from_config(data, settings["model"]["vocab_size"])
        prompt_ids = prompt_to_ids(args.prompt, tokenizer, settings["model"]["vocab_size"])
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    config = ModelConfig.from_saved(settings["model"])
    ids = sample(model, config, prompt_ids, args.max_new_tokens, settings["model"]["vocab_size"],
                 args.temperature, args.top_k, args.seed, args.top_p)
    print(tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.generate"))
