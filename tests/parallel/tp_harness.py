"""Shared helpers of the tensor-parallel tests: tiny model configs and gathering a TP model back to full shape."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.config.settings import ModelConfig
from megalite.parallel import state
from megalite.parallel.param_info import param_info

# GPT: vocabulary 101 with no rounding -> padded to 101 / 102 / 104 at TP 1 / 2 / 4 (not divisible by TP).
# LLaMA: GQA with 4 groups of 2 heads; vocabulary 100 rounded to multiples of 8 x TP (104 / 112 / 128).
VARIANTS = {
    "gpt": dict(vocab_size=101, make_vocab_size_divisible_by=1),
    "llama": dict(vocab_size=100, make_vocab_size_divisible_by=8, position_embedding_type="rope",
                  normalization="RMSNorm", swiglu=True, num_query_groups=4, untie_embeddings_and_output_weights=True),
}
RECOMPUTE = {
    "none": dict(),
    "selective": dict(recompute_granularity="selective"),
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}
VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def model_config(variant: str, recompute: str = "none", **overrides) -> ModelConfig:
    """A tiny model; its TP size is the process grid's, sequence parallelism an argument of GPTModel."""
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=8, ffn_hidden_size=64, seq_length=8,
                  hidden_dropout=0.0, attention_dropout=0.0, seed=11)
    fields.update(VARIANTS[variant])
    fields.update(RECOMPUTE[recompute])
    fields.update(overrides)
    return ModelConfig(**fields)


def batch(config: ModelConfig, micro_batch: int = 2, seed: int = 3):
    """(tokens, position_ids, labels), each [b, s], the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.vocab_size, (micro_batch, config.seq_length + 1), generator=generator)
    positions = torch.arange(config.seq_length).expand(micro_batch, -1)
    return text[:, :-1].contiguous(), positions, text[:, 1:].contiguous()


def gather_full(name: str, tensor: torch.Tensor, param: torch.nn.Parameter, vocab_size: int) -> torch.Tensor:
    """``tensor`` (a TP shard of ``param``, or its grad) concatenated over the TP group, vocabulary padding cut."""
    dim = param_info(param).partition_dim
    if dim is not None and state.grid_is_initialized() and state.get_grid().tp_size > 1:
        grid = state.get_grid()
        parts = [torch.empty_like(tensor) for _ in range(grid.tp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=grid.tp_group)
        tensor = torch.cat(parts, dim=dim)
    if name in VOCAB_PARALLEL:
        tensor = tensor[:vocab_size]
    return tensor.detach().clone()


def full_state(model, vocab_size: int, grads: bool = False) -> dict:
    """{name: full-shape parameter (or gradient)} of a possibly TP-split model."""
    return {name: gather_full(name, param.grad if grads else param, param, vocab_size)
            for name, param in model.named_parameters()}


def run_layout_matrix(train, model: list, variants: dict, training: list, cases: list):
    """(one-rank references by variant, {world size: per-rank results}) of a parity matrix: ``train(rank,
    world_size, [(name, argv)])`` runs each case; ``cases`` are (name, variant, world size, layout flags), run
    together per world size (one fork and rendezvous each)."""
    from megalite.parallel.testing import run_on_ranks
    references = run_on_ranks(train, 1, [(v, model + variants[v] + training) for v in variants], timeout=300)[0]
    by_world = {}
    for name, variant, world, layout in cases:
        by_world.setdefault(world, []).append((name, model + variants[variant] + training + layout))
    return references, {world: run_on_ranks(train, world, runs, timeout=400) for world, runs in by_world.items()}
