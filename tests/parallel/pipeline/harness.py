"""Train a tiny GPTModel a few steps under a pipeline layout and return what the parity tests compare.

The training step is the real one of ``megalite/training/loop.py``: ``forward_backward`` of the
schedule, ``finalize_model_grads`` (sums the tied embedding's grads over the first and last
stage), then ``build_optimizer``'s AdamW with clipping by the grid-wide gradient norm.  --clip-grad
0.5 is below the gradient norm of every step here (0.52 to 1.5), so clipping acts on each step and a
norm that counted the tied embedding twice, or missed a stage, would change every parameter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Imported here, before run_on_ranks forks: autograd imports it lazily on the first backward from a
# GradientEdge (the executor's sent outputs), ~1 s that every forked rank would otherwise pay.
import torch.fx.experimental.symbolic_shapes  # noqa: F401

from megalite.config.settings import ModelConfig, OptimizerConfig
from megalite.model.build import build_model_chunks
from megalite.model.loss import language_model_loss
from megalite.optim import build_optimizer
from megalite.parallel.grads import finalize_model_grads
from megalite.parallel.pipeline.schedules import get_forward_backward_func
from megalite.parallel.pipeline.timeline import Timeline
from megalite.parallel.state import destroy_grid, initialize_grid

STEPS = 5
MICRO_BATCH = 2

# GPT: LayerNorm, GELU, learned positions, biases, tied output layer; vocabulary 61 unpadded.
# LLaMA: RMSNorm, SwiGLU, rotary, 4 heads in 2 query groups, untied output layer; vocabulary 60
# padded to 64 (the padding columns must stay inert).
VARIANTS = {
    "gpt": dict(vocab_size=61, make_vocab_size_divisible_by=1),
    "llama": dict(vocab_size=60, make_vocab_size_divisible_by=8, normalization="RMSNorm", swiglu=True,
                  position_embedding_type="rope", num_query_groups=2, untie_embeddings_and_output_weights=True),
}
OPTIMIZER = OptimizerConfig(lr=1e-2, weight_decay=0.01, clip_grad=0.5)


def model_config(variant: str, num_layers: int) -> ModelConfig:
    """Tiny, dropout-free, fp32: hidden 16, 4 heads, sequence 8."""
    return ModelConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, seq_length=8,
                       hidden_dropout=0.0, attention_dropout=0.0, seed=5, **VARIANTS[variant])


def batches(config: ModelConfig, step: int, num_microbatches: int) -> list:
    """Micro-batches of step ``step`` ({tokens, labels, loss_mask}, each [b, s]): the same whatever the layout."""
    out = []
    for mb in range(num_microbatches):
        g = torch.Generator().manual_seed(1000 * step + mb)
        text = torch.randint(0, config.vocab_size, (MICRO_BATCH, config.seq_length + 1), generator=g)
        mask = torch.ones(MICRO_BATCH, config.seq_length)
        mask[0, -2:] = 0.0  # masked positions check the loss normalisation
        out.append({"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": mask})
    return out


def forward_step(data_iterator, chunk):
    batch = next(data_iterator)
    output = chunk(batch["tokens"], labels=batch["labels"])

    def loss_func(per_token_loss):  # [b, s], last stage only
        loss = language_model_loss(per_token_loss, batch["loss_mask"]).loss
        return loss, {"lm loss": loss.detach()}
    return output, loss_func


def global_named_parameters(chunk):
    """(name in the unsplit model, param): a chunk's local layer index i becomes ``chunk.layer_numbers[i]``."""
    for name, param in chunk.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(chunk.layer_numbers[int(parts[2])])
        yield ".".join(parts), param


def train(variant: str, num_layers: int, pp: int, schedule, num_microbatches: int, virtual=None):
    """(per-step mean loss, or None off the last stage; {global name: param}; peak live activations)."""
    config = model_config(variant, num_layers)
    grid = initialize_grid(pp=pp, virtual_pp=virtual)
    try:
        chunks = build_model_chunks(config, grid)
        optimizer = build_optimizer(chunks, OPTIMIZER, grid)
        forward_backward = get_forward_backward_func(pp, virtual, schedule)
        timeline = Timeline(grid.pp_rank)
        losses, peak = [], 0
        for step in range(STEPS):
            optimizer.zero_grad()
            timeline.peak_live_activations = 0
            loss_dicts = forward_backward(forward_step_func=forward_step,
                                          data_iterator=iter(batches(config, step, num_microbatches)),
                                          model=chunks, num_microbatches=num_microbatches,
                                          seq_length=config.seq_length, micro_batch_size=MICRO_BATCH,
                                          grid=grid, timeline=timeline)
            peak = max(peak, timeline.peak_live_activations)
            finalize_model_grads(chunks, grid)
            stepped, _ = optimizer.step()
            assert stepped
            losses.append(float(torch.stack([d["lm loss"] for d in loss_dicts]).mean()) if loss_dicts else None)
        named = {n: p.detach().clone() for c in chunks for n, p in global_named_parameters(c)}
        return losses, named, peak
    finally:
        destroy_grid()


def run_layouts(rank, world_size, layouts):
    """``layouts``: [(variant, num_layers, schedule, num_microbatches, virtual)], all at PP = world_size,
    in one forked call."""
    results = []
    for variant, num_layers, schedule, m, virtual in layouts:
        results.append(train(variant, num_layers, world_size, schedule, m, virtual))
        dist.barrier()
    return results
