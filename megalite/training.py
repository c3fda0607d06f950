"""The training loop: set up the grid, model, optimizer and data from the command line, then step.

    run = setup(argv)        # everything that can be refused (bad flags, data, layout) fails here
    train(run)               # iterations: forward/backward over micro-batches, reduce, step, log

One iteration (``train_step``)::

    zero grads -> forward_backward over num_microbatches = global_batch / (micro_batch x DP)
               -> finalize_model_grads (DP reduction, tied-embedding and sequence-parallel sums)
               -> optimizer.step() (clip, maybe skip on fp16 overflow) -> scheduler.step()

The loss is averaged over micro-batches on the last pipeline stage, then summed over the pipeline
and data-parallel groups so every rank logs the same number.  Only global rank 0 prints and writes
``--log-json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megalite import checkpoint
from megalite.config import (DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig,
                             parse_args)
from megalite.optim.schedulers import LRScheduler
from megalite.parallel import state
from megalite.parallel.launch import init_distributed
from megalite.scaling import flops


# What bad input raises during setup (a flag, a dataset, a tokenizer file); the data package's
# IndexedDatasetError and json/unicode decoding errors are ValueErrors.  Everything else is a bug.
SETUP_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def print_rank0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -- data ------------------------------------------------------------------------------------------
class MicroBatches:
    """This DP rank's micro-batches as dicts of tensors: tokens, labels, position_ids [b, s] int64,
    loss_mask [b, s] float32.  Resumable: starts after ``consumed_samples`` (global count)."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device):
        from megalite.data.sampler import PretrainingSampler
        self.dataset, self.device = dataset, device
        self.sampler = iter(PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        indices = next(self.sampler)
        items = [self.dataset[i] for i in indices]
        return {key: torch.from_numpy(np.stack([item[key] for item in items])).to(self.device)
                for key in ("tokens", "labels", "loss_mask", "position_ids")}


def build_tokenizer(data: DataConfig, vocab_size: int):
    if data.tokenizer_type is None:
        return None
    from megalite.data import build_tokenizer as build
    return build(data.tokenizer_type, vocab_file=data.vocab_file, merge_file=data.merge_file,
                 tokenizer_model=data.tokenizer_model, vocab_size=vocab_size)


def build_datasets(data: DataConfig, model: ModelConfig, training: TrainingConfig):
    """(train, valid) datasets sized for the run; valid is None when the split gives it nothing."""
    train_samples = training.train_iters * training.global_batch_size
    eval_samples = training.eval_iters * training.global_batch_size
    if data.mock_data:
        from megalite.data.gpt_dataset import MockGPTDataset
        # The validation stream uses another seed, so evaluation never sees training samples.
        train = MockGPTDataset(model.vocab_size, model.seq_length, train_samples, model.seed)
        valid = MockGPTDataset(model.vocab_size, model.seq_length, max(eval_samples, 1), model.seed + 1)
        return train, valid
    from megalite.data.gpt_dataset import build_gpt_datasets
    prefixes = list(data.data_path)
    # As in Megatron: index arrays are cached next to the data unless --data-cache-path says where,
    # so one rank builds them and every other rank (and every later run) memory-maps them.
    cache_dir = data.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[-1])), "cache",
                                                     "GPTDataset_indices")
    train, valid, _ = build_gpt_datasets(prefixes, data.split, model.seq_length, model.seed,
                                         (train_samples, eval_samples, 0), cache_dir=cache_dir)
    if train is None:
        raise ValueError(f"--split {data.split!r} leaves no training data; give the first part a positive weight")
    return train, valid


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds between iterations."""

    model_cfg: ModelConfig
    parallel_cfg: ParallelConfig
    opt_cfg: OptimizerConfig
    data_cfg: DataConfig
    train_cfg: TrainingConfig
    grid: Any
    device: torch.device
    model: List[torch.nn.Module]
    layer_numbers: Optional[List[List[int]]]
    optimizer: Any
    scheduler: LRScheduler
    forward_backward: Callable
    train_dataset: Any
    valid_dataset: Any
    tokenizer: Any
    num_microbatches: int
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    train_iter: Optional[Iterator] = None
    history: List[dict] = field(default_factory=list)   # one record per iteration (what --log-json writes)

    def settings(self) -> dict:
        """The configs as plain dicts (stored in checkpoints; read by megalite/generate.py)."""
        return {name: dataclasses.asdict(cfg) for name, cfg in (
            ("model", self.model_cfg), ("parallel", self.parallel_cfg), ("optimizer", self.opt_cfg),
            ("data", self.data_cfg), ("training", self.train_cfg))}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    from megalite.parallel.random import model_parallel_seed
    model_parallel_seed(seed)


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, grid, device: torch.device):
    """Model chunks of this rank (one per virtual stage) and their global layer numbers."""
    from megalite.model.gpt import GPTModel
    from megalite.parallel.pipeline import stages
    chunks = stages.build_model_chunks(model_cfg, grid, model_cls=GPTModel,
                                       first_stage_layers=parallel_cfg.decoder_first_pipeline_num_layers,
                                       last_stage_layers=parallel_cfg.decoder_last_pipeline_num_layers)
    layer_numbers = [stages.layer_numbers_for(model_cfg.num_layers, grid.pp_size, grid.pp_rank,
                                              grid.virtual_pp_size, v,
                                              parallel_cfg.decoder_first_pipeline_num_layers,
                                              parallel_cfg.decoder_last_pipeline_num_layers)
                     for v in range(len(chunks))]
    chunks = [chunk.to(device) for chunk in chunks]
    return chunks, layer_numbers


def wrap_ddp(chunks, opt_cfg: OptimizerConfig, grid):
    """Wrap each chunk in megalite's DDP (contiguous fp32 grad buffer, bucketed reduction) when it helps.

    DDP is needed for data parallelism with overlap or ZeRO-1, and gives half-precision models fp32
    gradient accumulation.  A lone fp32 replica stays a plain module: finalize_model_grads handles
    plain modules (grads in ``.grad``), and there is nothing to reduce.
    """
    needed = grid.dp_size * grid.cp_size > 1 or opt_cfg.bf16 or opt_cfg.fp16 or \
        opt_cfg.use_distributed_optimizer or opt_cfg.overlap_grad_reduce
    if not needed:
        return chunks
    from megalite.parallel.data_parallel import DistributedDataParallel
    kwargs = {"overlap_grad_reduce": opt_cfg.overlap_grad_reduce,
              "use_distributed_optimizer": opt_cfg.use_distributed_optimizer}
    if opt_cfg.ddp_bucket_size is not None:
        kwargs["bucket_size"] = opt_cfg.ddp_bucket_size
    return [DistributedDataParallel(chunk, grid, **kwargs) for chunk in chunks]


def setup(argv=None, world_size: Optional[int] = None) -> Run:
    """Parse flags, start the grid, build model/optimizer/scheduler/data, resume if --load.

    Raises ValueError / FileNotFoundError (one-line messages) on bad input, before training starts.
    """
    if world_size is None and dist.is_initialized():  # e.g. ranks forked by megalite.testing, no WORLD_SIZE
        world_size = dist.get_world_size()
    model_cfg, parallel_cfg, opt_cfg, data_cfg, train_cfg = parse_args(argv, world_size=world_size)
    init_distributed(timeout_minutes=parallel_cfg.distributed_timeout_minutes)
    if dist.get_world_size() != parallel_cfg.world_size:
        raise ValueError(f"the launcher started {dist.get_world_size()} ranks but the flags were checked for "
                         f"world size {parallel_cfg.world_size}; set WORLD_SIZE to match")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = build_tokenizer(data_cfg, model_cfg.vocab_size)
    if tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    train_dataset, valid_dataset = build_datasets(data_cfg, model_cfg, train_cfg)

    grid = state.initialize_grid(tp=parallel_cfg.tensor_model_parallel_size,
                                 pp=parallel_cfg.pipeline_model_parallel_size,
                                 cp=parallel_cfg.context_parallel_size,
                                 virtual_pp=parallel_cfg.virtual_pipeline_model_parallel_size)
    num_microbatches = train_cfg.num_microbatches(grid.dp_size)
    # Dropout differs per pipeline stage (Megatron's seed offset); the TP tracker derives its own.
    _seed_everything(model_cfg.seed + 100 * grid.pp_rank)

    model, layer_numbers = build_model(model_cfg, parallel_cfg, grid, device)
    if opt_cfg.bf16 or opt_cfg.fp16:
        dtype = torch.bfloat16 if opt_cfg.bf16 else torch.float16
        model = [chunk.to(dtype) for chunk in model]
    model = wrap_ddp(model, opt_cfg, grid)
    from megalite.optim import build_optimizer
    optimizer = build_optimizer(model, opt_cfg, grid)
    scheduler = LRScheduler(optimizer, opt_cfg.lr, opt_cfg.min_lr, train_cfg.lr_warmup_iters,
                            train_cfg.lr_decay_iters, train_cfg.lr_decay_style)
    from megalite.parallel.pipeline.schedules import get_forward_backward_func
    forward_backward = get_forward_backward_func(grid.pp_size, grid.virtual_pp_size, parallel_cfg.pipeline_schedule)

    run = Run(model_cfg, parallel_cfg, opt_cfg, data_cfg, train_cfg, grid, device, model, layer_numbers,
              optimizer, scheduler, forward_backward, train_dataset, valid_dataset, tokenizer, num_microbatches)
    # `--save X --load X` is the resume idiom: before the first save there is nothing to load.
    fresh_resume = train_cfg.load is not None and train_cfg.load == train_cfg.save and not os.path.isdir(train_cfg.load)
    if train_cfg.load is not None and not fresh_resume:
        run.iteration, run.consumed_samples = checkpoint.load_checkpoint(
            train_cfg.load, model, optimizer, scheduler, grid, sharded_optimizer=opt_cfg.use_distributed_optimizer)
        if run.iteration:
            print_rank0(f"resumed from {train_cfg.load} at iteration {run.iteration} "
                        f"({run.consumed_samples} samples consumed)")
    run.train_iter = MicroBatches(train_dataset, run.consumed_samples, train_cfg.micro_batch_size,
                                  grid.dp_rank, grid.dp_size, device)
    return run


# -- one step --------------------------------------------------------------------------------------
def _forward_step_func(run: Run, scale_loss: bool):
    from megalite.model.gpt import loss_from_per_token

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output = model_chunk(batch["tokens"], batch["position_ids"], labels=batch["labels"])

        def loss_func(per_token_loss):  # per_token_loss: [b, s] float32, on the last stage only
            loss = loss_from_per_token(per_token_loss.float(), batch["loss_mask"])
            backward_loss = run.optimizer.scale_loss(loss) if scale_loss else loss
            return backward_loss, {"lm loss": loss.detach()}
        return output, loss_func
    return forward_step


def _no_sync_func(model):
    if not all(hasattr(chunk, "no_sync") for chunk in model):
        return None

    @contextlib.contextmanager
    def no_sync():
        with contextlib.ExitStack() as stack:
            for chunk in model:
                stack.enter_context(chunk.no_sync())
            yield
    return no_sync


def _average_loss(run: Run, losses: List[dict]) -> float:
    """Mean micro-batch loss of the step, known on every rank (sum over PP: only the last stage has it)."""
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    if losses:
        total[0] = sum(float(d["lm loss"]) for d in losses)
        total[1] = len(losses)
    if run.grid.pp_size > 1:
        dist.all_reduce(total, group=run.grid.pp_group)
    if run.grid.dp_size > 1:
        dist.all_reduce(total, group=run.grid.dp_group)
    return float(total[0] / total[1])


def train_step(run: Run, timeline=None) -> dict:
    """One optimizer step over the global batch; returns the iteration's record (loss, lr, grad norm).

    ``timeline`` (pipeline/timeline.py) records every forward/backward pass of this step."""
    for chunk in run.model:
        chunk.train()
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    lr = run.scheduler.lr
    losses = run.forward_backward(
        forward_step_func=_forward_step_func(run, scale_loss=True), data_iterator=run.train_iter, model=run.model,
        num_microbatches=run.num_microbatches, seq_length=run.model_cfg.seq_length,
        micro_batch_size=run.train_cfg.micro_batch_size, forward_only=False,
        no_sync_func=_no_sync_func(run.model), grid=run.grid, timeline=timeline)
    from megalite.parallel.grads import finalize_model_grads
    finalize_model_grads(run.model, run.grid)
    stepped, grad_norm = run.optimizer.step()
    if stepped:
        run.scheduler.step()
    else:
        run.skipped_steps += 1
    run.iteration += 1
    run.consumed_samples += run.train_cfg.global_batch_size
    return {"iteration": run.iteration, "loss": _average_loss(run, losses), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "loss_scale": float(getattr(run.optimizer, "loss_scale", 1.0)), "skipped_steps": run.skipped_steps,
            "consumed_samples": run.consumed_samples}


@torch.no_grad()
def evaluate(run: Run) -> Optional[dict]:
    """Validation loss and perplexity over --eval-iters global batches.

    Every evaluation reads the same first batches of the validation set, so numbers are comparable
    across iterations and a resumed run evaluates exactly what the uninterrupted one did.
    """
    if run.valid_dataset is None or run.train_cfg.eval_iters == 0:
        return None
    for chunk in run.model:
        chunk.eval()
    batches = MicroBatches(run.valid_dataset, 0, run.train_cfg.micro_batch_size, run.grid.dp_rank,
                           run.grid.dp_size, run.device)
    losses = []
    for _ in range(run.train_cfg.eval_iters):
        losses += run.forward_backward(
            forward_step_func=_forward_step_func(run, scale_loss=False), data_iterator=batches, model=run.model,
            num_microbatches=run.num_microbatches, seq_length=run.model_cfg.seq_length,
            micro_batch_size=run.train_cfg.micro_batch_size, forward_only=True, grid=run.grid)
    for chunk in run.model:
        chunk.train()
    loss = _average_loss(run, losses)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


# -- logging ---------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Logger:
    """Prints a line every --log-interval (rank 0) and writes every iteration to --log-json."""

    def __init__(self, run: Run):
        self.run = run
        cfg = run.train_cfg
        self.flops_per_iter = flops.flops_per_iteration(run.model_cfg, cfg.global_batch_size)
        self.peak_tflops = cfg.peak_tflops or flops.default_peak_tflops(run.opt_cfg.bf16 or run.opt_cfg.fp16,
                                                                      run.device)
        self.tokens_per_iter = cfg.global_batch_size * run.model_cfg.seq_length
        self.is_writer = run.grid.rank == 0
        self.json_file = None
        if self.is_writer and cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.log_json)), exist_ok=True)
            # Appending keeps the earlier records of a resumed run.
            self.json_file = open(cfg.log_json, "a" if cfg.load else "w")
        self.window: List[dict] = []
        self.start_time = time.perf_counter()
        self.start_iteration = run.iteration

    def record(self, record: dict, step_seconds: float) -> dict:
        run = self.run
        tflops = self.flops_per_iter / step_seconds / run.grid.world_size / 1e12
        record.update(elapsed_ms=step_seconds * 1e3, tokens_per_sec=self.tokens_per_iter / step_seconds,
                      tflops_per_device=tflops, mfu=flops.mfu(tflops, self.peak_tflops),
                      peak_memory_mb=peak_memory_mb(run.device))
        run.history.append(record)
        self.window.append(record)
        if self.json_file is not None:
            self.json_file.write(json.dumps(record) + "\n")
            self.json_file.flush()
        if record["iteration"] % run.train_cfg.log_interval == 0 or record["iteration"] == run.train_cfg.train_iters:
            self.print_window()
        return record

    def print_window(self) -> None:
        if not self.window:
            return
        run, w = self.run, self.window
        last = w[-1]
        seconds = sum(r["elapsed_ms"] for r in w) / 1e3
        done = last["iteration"] - self.start_iteration
        remaining = run.train_cfg.train_iters - last["iteration"]
        eta = (time.perf_counter() - self.start_time) / max(done, 1) * remaining
        grad_norm = "n/a" if last["grad_norm"] is None else f"{last['grad_norm']:.3f}"
        line = (f"iteration {last['iteration']:>6}/{run.train_cfg.train_iters} | "
                f"loss {sum(r['loss'] for r in w) / len(w):.4f} | lr {last['lr']:.3e} | grad norm {grad_norm} | "
                f"tokens/s {self.tokens_per_iter * len(w) / seconds:,.0f} | "
                f"TFLOP/s/device {sum(r['tflops_per_device'] for r in w) / len(w):.3f} | "
                f"MFU {100 * sum(r['mfu'] for r in w) / len(w):.2f}% | "
                f"peak mem {last['peak_memory_mb']:.0f} MB | skipped {last['skipped_steps']} | ETA {_format_eta(eta)}")
        if "eval_loss" in last:
            line += f" | eval loss {last['eval_loss']:.4f} ppl {last['eval_ppl']:.2f}"
        print_rank0(line)
        self.window = []

    def close(self) -> None:
        if self.json_file is not None:
            self.json_file.close()


# -- the loop --------------------------------------------------------------------------------------
def _new_timeline(run: Run):
    from megalite.parallel.pipeline.timeline import Timeline
    return Timeline(stage=run.grid.pp_rank)


def _draw_timeline(run: Run, timeline) -> float:
    """Gather the pipeline's spans, draw --timeline (global rank 0) and return the bubble fraction."""
    from megalite.parallel.pipeline.timeline import bubble_fraction, draw_timeline, gather_spans
    spans = gather_spans(timeline, run.grid) if run.grid.pp_size > 1 else list(timeline.spans)
    bubble = torch.tensor([bubble_fraction(spans) if spans is not None else 0.0], dtype=torch.float64,
                          device=run.device)
    if run.grid.pp_size > 1:  # pipeline rank 0 has the number; make it known to the whole pipeline
        dist.broadcast(bubble, src=run.grid.ranks["pp"][0], group=run.grid.pp_group)
    if run.grid.rank == 0:
        g = run.grid
        path = draw_timeline(spans, run.train_cfg.timeline,
                             title=f"iteration {run.iteration}: PP={g.pp_size} vPP={g.virtual_pp_size or 1}, "
                                   f"{run.num_microbatches} micro-batches")
        print_rank0(f"pipeline timeline of iteration {run.iteration}: {path} "
                    f"(bubble fraction {float(bubble):.3f})")
    return float(bubble)


def save(run: Run) -> None:
    checkpoint.save_checkpoint(run.train_cfg.save, run.iteration, run.model, run.optimizer, run.scheduler,
                               run.grid, consumed_samples=run.consumed_samples, settings=run.settings(),
                               sharded_optimizer=run.opt_cfg.use_distributed_optimizer,
                               layer_numbers=run.layer_numbers)
    print_rank0(f"saved checkpoint of iteration {run.iteration} to {run.train_cfg.save}")


def train(run: Run) -> List[dict]:
    """Train from run.iteration to --train-iters; returns the per-iteration records."""
    cfg = run.train_cfg
    logger = Logger(run)
    g = run.grid
    print_rank0(f"training {flops.count_parameters(run.model_cfg):,} parameters on {g.world_size} rank(s) "
                f"(TP={g.tp_size} PP={g.pp_size} DP={g.dp_size} CP={g.cp_size}), global batch "
                f"{cfg.global_batch_size} = {run.num_microbatches} micro-batches x {cfg.micro_batch_size} x DP "
                f"{g.dp_size}, {cfg.train_iters} iterations")
    saved_at = None
    try:
        while run.iteration < cfg.train_iters:
            start = time.perf_counter()
            last = run.iteration + 1 == cfg.train_iters or (cfg.exit_interval and (run.iteration + 1) % cfg.exit_interval == 0)
            timeline = _new_timeline(run) if cfg.timeline and last else None
            record = train_step(run, timeline)
            seconds = time.perf_counter() - start
            if timeline is not None:
                record["bubble_fraction"] = _draw_timeline(run, timeline)
            if run.iteration % cfg.eval_interval == 0 or run.iteration == cfg.train_iters:
                evaluation = evaluate(run)
                if evaluation is not None:
                    record.update(evaluation)
            logger.record(record, seconds)
            if cfg.save and cfg.save_interval and run.iteration % cfg.save_interval == 0:
                save(run)
                saved_at = run.iteration
            if cfg.exit_interval and run.iteration % cfg.exit_interval == 0:
                print_rank0(f"exiting at iteration {run.iteration} (--exit-interval {cfg.exit_interval})")
                break
        if cfg.save and saved_at != run.iteration:
            save(run)
    finally:
        logger.close()
    return run.history


def pretrain(argv=None) -> List[dict]:
    """Set up and train from Megatron-style flags; returns the per-iteration records."""
    started_distributed = not dist.is_initialized()
    try:
        run = setup(argv)
        return train(run)
    finally:
        state.destroy_grid()
        if started_distributed and dist.is_initialized():
            dist.destroy_process_group()

