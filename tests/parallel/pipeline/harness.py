"""Train a few steps under a pipeline layout on forked ranks and return what parity tests compare."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.parallel.grads import finalize_model_grads
from megalite.parallel.pipeline.schedules import get_forward_backward_func
from megalite.parallel.pipeline.stages import build_model_chunks
from megalite.parallel.pipeline.timeline import Timeline
from megalite.parallel.state import destroy_grid, initialize_grid

STEPS = 5
MICRO_BATCH = 2


def batches(config, step, num_microbatches):
    """Deterministic micro-batches of step ``step``: the same whatever the layout."""
    out = []
    for mb in range(num_microbatches):
        g = torch.Generator().manual_seed(1000 * step + mb)
        tokens = torch.randint(0, config.vocab_size, (MICRO_BATCH, config.seq_length + 1), generator=g)
        mask = torch.ones(MICRO_BATCH, config.seq_length)
        mask[0, -2:] = 0.0  # a masked position checks the loss normalisation
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
    return out


def forward_step(data_iterator, chunk):
    batch = next(data_iterator)
    output = chunk(batch["tokens"], labels=batch["labels"])

    def loss_func(per_token):
        loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        return loss, {"lm loss": loss.detach()}
    return output, loss_func


def train(config, model_cls, pp, schedule, num_microbatches, virtual=None, lr=0.1):
    """Returns (per-step mean loss or None off the last stage, {param name: tensor}, peak live activations)."""
    grid = initialize_grid(pp=pp, virtual_pp=virtual)
    try:
        torch.manual_seed(0)
        chunks = build_model_chunks(config, grid, model_cls)
        params = [p for c in chunks for p in c.parameters()]
        optimizer = torch.optim.SGD(params, lr=lr)
        forward_backward = get_forward_backward_func(pp, virtual, schedule)
        timeline = Timeline(grid.pp_rank)
        losses, peak = [], 0
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            timeline.peak_live_activations = 0
            loss_dicts = forward_backward(forward_step_func=forward_step,
                                          data_iterator=iter(batches(config, step, num_microbatches)),
                                          model=chunks, num_microbatches=num_microbatches,
                                          seq_length=config.seq_length, micro_batch_size=MICRO_BATCH,
                                          grid=grid, timeline=timeline)
            peak = max(peak, getattr(timeline, "peak_live_activations", 0))
            finalize_model_grads(chunks, grid)
            optimizer.step()
            losses.append(float(torch.stack([d["lm loss"] for d in loss_dicts]).mean()) if loss_dicts else None)
        named = {}
        for c in chunks:
            named.update({n: p.detach().clone() for n, p in c.named_parameters()})
        return losses, named, peak
    finally:
        destroy_grid()


def run_layouts(rank, world_size, config, model_cls, layouts):
    """``layouts``: [(schedule, num_microbatches, virtual)], all at PP = world_size, in one forked call."""
    results = []
    for schedule, m, virtual in layouts:
        results.append(train(config, model_cls, world_size, schedule, m, virtual))
        dist.barrier()
    return results
