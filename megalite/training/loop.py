"""The training loop: set up the grid, model, optimizer and data from the command line, then step.

    run = setup(argv)        # everything that can be refused (bad flags, data, layout) fails here
    train(run)               # iterations: forward/backward over micro-batches, reduce, step, log

One iteration (``train_step``; docs/architecture.md, "One training step")::

    zero grads -> forward_backward over num_microbatches = global_batch / (micro_batch x DP)
               -> finalize_model_grads (DP reduction, tied-embedding and sequence-parallel sums)
               -> optimizer.step() (clip, maybe skip on fp16 overflow) -> scheduler.step()

The loss is averaged over micro-batches on the last pipeline stage, then summed over the pipeline and
data-parallel groups so every rank logs the same number.  Only global rank 0 prints and writes ``--log-json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megalite.checkpoint import save_load as checkpoint
from megalite.checkpoint.manifest import new_run_id
from megalite.checkpoint.reshard import load_any_layout
from megalite.config.settings import ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from megalite.data.training_data import MicroBatches, datasets_from_config, packing_from_config, tokenizer_from_config
from megalite.log import print_rank0
from megalite.model import flops
from megalite.model.build import build_model, wrap_for_data_parallel
from megalite.model.compile import compile_layers
from megalite.model.loss import language_model_loss
from megalite.optim import build_optimizer
from megalite.optim.schedulers import LRScheduler
from megalite.parallel import state
from megalite.parallel.grads import finalize_model_grads
from megalite.parallel.launch import init_distributed, shut_down_distributed
from megalite.parallel.pipeline.schedules import get_forward_backward_func
from megalite.parallel.pipeline.timeline import Timeline, draw_step_timeline
from megalite.parallel.random import model_parallel_seed
from megalite.training.arguments import check_machine, check_output_folders, parse_args, resolved_config
from megalite.training.batch_schedule import run_batch_schedule
from megalite.training.exit_conditions import ExitSignal, exit_reason
from megalite.training.loss_normalization import average_loss, normalize_grads_per_token, per_token_terms
from megalite.training.memory_hygiene import ManualGarbageCollection, empty_unused_memory
from megalite.training.metric_writers import build_writers
from megalite.training.metrics import Logger
from megalite.training.moe_step import begin_moe_step, end_moe_step
from megalite.training.profiling import StepProfiler
from megalite.training.run import Run
from megalite.training.saved_settings import check_saved_model

__all__ = ["SETUP_ERRORS", "TrainingDiverged", "Run", "setup", "train_step", "evaluate", "save", "train", "pretrain"]

# What bad input raises during setup (a flag, a dataset, a tokenizer file); the data package's
# IndexedDatasetError and json/unicode decoding errors are ValueErrors.  Everything else is a bug.
SETUP_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row skipped for inf/nan gradients: the run cannot recover."""


def agreed_run_id() -> str:
    """A fresh run id, the same on every rank (rank 0 draws it)."""
    drawn = [new_run_id()]
    dist.broadcast_object_list(drawn, src=0)
    return drawn[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_seed(seed)


# -- set up ----------------------------------------------------------------------------------------
def setup(argv=None, world_size: Optional[int] = None) -> Run:
    """Parse flags, start the grid, build model/optimizer/scheduler/data, resume if --load; raises ValueError /
    FileNotFoundError (one-line messages) on bad input, before training starts."""
    started_at = time.time()
    model_cfg, parallel_cfg, opt_cfg, data_cfg, train_cfg = _parse_and_join(argv, world_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = tokenizer_from_config(data_cfg, model_cfg.vocab_size)
    if tokenizer is not None and tokenizer.vocab_size != model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    packing = packing_from_config(data_cfg, tokenizer, model_cfg.vocab_size)
    train_dataset, valid_dataset = datasets_from_config(data_cfg, model_cfg, train_cfg, packing)
    if valid_dataset is None and train_cfg.eval_iters > 0:
        print_rank0(f"--split {data_cfg.split} gives no validation data: evaluation (--eval-iters "
                    f"{train_cfg.eval_iters}) is skipped; give the split's second part a weight to evaluate")

    grid = state.initialize_grid(tp=parallel_cfg.tensor_model_parallel_size,
                                 pp=parallel_cfg.pipeline_model_parallel_size, cp=parallel_cfg.context_parallel_size,
                                 virtual_pp=parallel_cfg.virtual_pipeline_model_parallel_size,
                                 cp_comm_type=parallel_cfg.cp_comm_type, ep=parallel_cfg.expert_model_parallel_size,
                                 moe=model_cfg.num_experts is not None,
                                 etp=parallel_cfg.expert_tensor_parallel_size or 1)
    batch_schedule = run_batch_schedule(train_cfg, model_cfg.seq_length, grid.dp_size)
    # Dropout differs per pipeline stage (Megatron's seed offset); the TP tracker derives its own.
    seed_everything(model_cfg.seed + 100 * grid.pp_rank)
    model, layer_numbers = _model_as_trained(model_cfg, parallel_cfg, opt_cfg, train_cfg, grid, device)
    optimizer = build_optimizer(model, opt_cfg, grid)
    scheduler = LRScheduler(optimizer, opt_cfg.lr, opt_cfg.min_lr, *train_cfg.lr_schedule_steps(),
                            train_cfg.lr_decay_style, decoupled=opt_cfg.decoupled_lr_range())
    forward_backward = get_forward_backward_func(grid.pp_size, grid.virtual_pp_size, parallel_cfg.pipeline_schedule)

    run = Run(model_cfg, parallel_cfg, opt_cfg, data_cfg, train_cfg, grid, device, model, layer_numbers,
              optimizer, scheduler, forward_backward, train_dataset, valid_dataset, tokenizer, batch_schedule,
              train_cfg.num_microbatches(grid.dp_size), started_at=started_at, packing=packing)
    _resume(run)
    run.train_iter = MicroBatches(train_dataset, run.consumed_samples, train_cfg.micro_batch_size, grid.dp_rank,
                                  grid.dp_size, device, grid.cp_size, grid.cp_rank, data_cfg.num_workers, packing)
    return run


def _parse_and_join(argv, world_size: Optional[int]):
    """The run's five configs, checked, and this process joined to the run's ranks."""
    if world_size is None and dist.is_initialized():  # e.g. ranks forked by megalite.parallel.testing, no WORLD_SIZE
        world_size = dist.get_world_size()
    configs = parse_args(argv, world_size=world_size)
    check_output_folders(configs[4])
    parallel_cfg = configs[1]
    check_machine(parallel_cfg, configs[4])
    init_distributed(backend=parallel_cfg.distributed_backend, timeout_minutes=parallel_cfg.distributed_timeout_minutes)
    if dist.get_world_size() != parallel_cfg.world_size:
        raise ValueError(f"the launcher started {dist.get_world_size()} ranks but the flags were checked for "
                         f"world size {parallel_cfg.world_size}; set WORLD_SIZE to match")
    return configs


def _model_as_trained(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, opt_cfg: OptimizerConfig,
                      train_cfg: TrainingConfig, grid, device: torch.device):
    """This rank's chunks in the run's precision, compiled if asked, wrapped for data parallelism; and
    their global layer numbers."""
    model, layer_numbers = build_model(model_cfg, parallel_cfg, grid, device)
    if opt_cfg.bf16 or opt_cfg.fp16:
        dtype = torch.bfloat16 if opt_cfg.bf16 else torch.float16
        model = [chunk.to(dtype) for chunk in model]
    if train_cfg.compile:
        for chunk in model:
            compile_layers(chunk, train_cfg.compile_backend)
    return wrap_for_data_parallel(model, opt_cfg, grid), layer_numbers


def _resume(run: Run) -> None:
    """Restore --load's checkpoint into the run (any layout), and settle the run's id."""
    train_cfg = run.train_cfg
    # `--save X --load X` is the resume idiom: before the first save there is nothing to load.
    same_folder = train_cfg.load is not None and train_cfg.save is not None and \
        os.path.realpath(train_cfg.load) == os.path.realpath(train_cfg.save)
    fresh_resume = same_folder and not os.path.isdir(train_cfg.load)
    resumed = None
    if train_cfg.load is not None and not fresh_resume:
        check_saved_model(train_cfg.load, run.model_cfg)
        resumed = load_any_layout(
            train_cfg.load, run.model, run.optimizer, run.scheduler, run.grid, layer_numbers=run.layer_numbers,
            sharded_optimizer=run.opt_cfg.shards_optimizer() and run.opt_cfg.sharding_strategy(),
            load_optimizer=not train_cfg.no_load_optim, load_rng=not train_cfg.no_load_rng,
            weights_only=train_cfg.finetune)
        run.iteration, run.consumed_samples = resumed.iteration, resumed.consumed_samples
        if run.iteration:
            print_rank0(f"resumed from {train_cfg.load} at iteration {run.iteration} "
                        f"({run.consumed_samples} samples consumed)")
    run.run_id = resumed.run_id if resumed is not None and resumed.run_id else agreed_run_id()


# -- one step --------------------------------------------------------------------------------------
def forward_step_func(run: Run, scale_loss: bool):
    """The schedules' ``forward_step_func``: one micro-batch through a chunk, and its loss function.

    Under context parallelism the batch holds this CP rank's tokens (``MicroBatches``); the loss
    to backpropagate is scaled so that DDP's average over DP x CP gives the one-rank gradient, and
    the logged loss is the micro-batch's mean over all its tokens (megalite/model/loss.py)."""
    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output = model_chunk(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                             documents=batch.get("documents"))

        def loss_func(per_token_loss):  # per_token_loss: [b, s/cp] float32, on the last stage only
            if run.train_cfg.calculate_per_token_loss:   # (sum, tokens, dict): undivided (loss_normalization.py)
                loss_sum, tokens, mean_loss = per_token_terms(per_token_loss.float(), batch["loss_mask"])
                backward_sum = run.optimizer.scale_loss(loss_sum) if scale_loss else loss_sum
                return backward_sum, tokens, {"lm loss": mean_loss}
            loss, mean_loss = language_model_loss(per_token_loss.float(), batch["loss_mask"])
            backward_loss = run.optimizer.scale_loss(loss) if scale_loss else loss
            return backward_loss, {"lm loss": mean_loss}
        return output, loss_func
    return forward_step


def no_sync_func(model: List[torch.nn.Module]):
    """A context manager factory suppressing every DDP chunk's reduction, or None for plain modules."""
    if not all(hasattr(chunk, "no_sync") for chunk in model):
        return None

    @contextlib.contextmanager
    def no_sync():
        with contextlib.ExitStack() as stack:
            for chunk in model:
                stack.enter_context(chunk.no_sync())
            yield
    return no_sync


def train_step(run: Run, timeline: Optional[Timeline] = None, num_microbatches: Optional[int] = None) -> dict:
    """One optimizer step over the global batch; returns the iteration's record (loss, lr, grad norm, MoE
    losses).  ``timeline`` (pipeline/timeline.py) records every forward/backward pass of this step.
    ``num_microbatches`` overrides the batch schedule's size of this step (per data-parallel rank)."""
    if num_microbatches is None:
        num_microbatches = run.batch_schedule.num_microbatches(run.consumed_samples)
    global_batch_size = num_microbatches * run.train_cfg.micro_batch_size * run.grid.dp_size
    for chunk in run.model:
        chunk.train()
    run.optimizer.zero_grad()
    lr = run.scheduler.lr
    begin_moe_step(float(run.optimizer.loss_scale), num_microbatches)
    losses = run.forward_backward(
        forward_step_func=forward_step_func(run, scale_loss=True), data_iterator=run.train_iter, model=run.model,
        num_microbatches=num_microbatches, seq_length=run.model_cfg.seq_length,
        micro_batch_size=run.train_cfg.micro_batch_size, forward_only=False,
        no_sync_func=no_sync_func(run.model), grid=run.grid, timeline=timeline)
    empty_unused_memory(run.train_cfg.empty_unused_memory_level, 1)
    finalize_model_grads(run.model, run.grid)
    moe_losses = end_moe_step(run.model, run.grid, run.model_cfg, num_microbatches, run.device)
    if run.train_cfg.calculate_per_token_loss:
        normalize_grads_per_token(run.model, run.grid, losses, run.device)
    stepped, grad_norm = run.optimizer.step()
    empty_unused_memory(run.train_cfg.empty_unused_memory_level, 2)
    if stepped:  # the schedule counts samples with --train-samples, else steps
        run.scheduler.step(global_batch_size if run.train_cfg.train_samples is not None else 1)
    run.iteration += 1
    run.consumed_samples += global_batch_size
    return {"iteration": run.iteration, "loss": average_loss(run.grid, losses, run.device), "lr": lr,
            "global_batch_size": global_batch_size,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "loss_scale": float(run.optimizer.loss_scale), "skipped_steps": run.optimizer.num_skipped_steps,
            "consumed_samples": run.consumed_samples, **moe_losses}


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
    batches = MicroBatches(run.valid_dataset, 0, run.train_cfg.micro_batch_size, run.grid.dp_rank, run.grid.dp_size,
                           run.device, run.grid.cp_size, run.grid.cp_rank, run.data_cfg.num_workers, run.packing)
    losses = []
    for _ in range(run.train_cfg.eval_iters):
        losses += run.forward_backward(
            forward_step_func=forward_step_func(run, scale_loss=False), data_iterator=batches, model=run.model,
            num_microbatches=run.num_microbatches, seq_length=run.model_cfg.seq_length,
            micro_batch_size=run.train_cfg.micro_batch_size, forward_only=True, grid=run.grid)
    for chunk in run.model:
        chunk.train()
    empty_unused_memory(run.train_cfg.empty_unused_memory_level, 1)   # as Megatron-LM does after evaluation
    loss = average_loss(run.grid, losses, run.device)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


# -- the loop --------------------------------------------------------------------------------------
def save(run: Run) -> None:
    checkpoint.save_checkpoint(run.train_cfg.save, run.iteration, run.model, run.optimizer, run.scheduler,
                               run.grid, consumed_samples=run.consumed_samples, run_id=run.run_id,
                               settings=run.settings(),
                               sharded_optimizer=run.opt_cfg.shards_optimizer() and run.opt_cfg.sharding_strategy(),
                               layer_numbers=run.layer_numbers)
    if not run.config_saved:   # only now does the run own the folder: save_checkpoint refuses another run's
        write_resolved_config(run, [run.train_cfg.save])
        run.config_saved = True
    print_rank0(f"saved checkpoint of iteration {run.iteration} to {run.train_cfg.save}")


def write_resolved_config(run: Run, folders) -> None:
    """The settings the run ended up with, as --config reads them, in each of ``folders`` (rank 0)."""
    if run.grid.rank != 0:
        return
    text = yaml.safe_dump(resolved_config(run.configs()), sort_keys=False)
    for folder in sorted(f for f in set(folders) if f):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(text)


def log_folders(cfg: TrainingConfig) -> set:
    """Where the run writes its logs: --tensorboard-dir and --log-json's folder (not --save: a save folder
    gets its config.yaml with the run's first checkpoint, once the run is known to own the folder)."""
    return {cfg.tensorboard_dir, os.path.dirname(os.path.abspath(cfg.log_json)) if cfg.log_json else None}


def draw_timeline(run: Run, timeline: Timeline, num_microbatches: int) -> float:
    """Draw this step's pipeline timeline to --timeline; returns the bubble fraction."""
    g = run.grid
    bubble = draw_step_timeline(timeline, g, run.train_cfg.timeline, device=run.device,
                                title=f"iteration {run.iteration}: PP={g.pp_size} vPP={g.virtual_pp_size or 1}, "
                                      f"{num_microbatches} micro-batches")
    print_rank0(f"pipeline timeline of iteration {run.iteration}: {run.train_cfg.timeline} "
                f"(bubble fraction {bubble:.3f})")
    return bubble


def _saved_already(run: Run) -> Optional[int]:
    """The starting iteration when the run resumed from its own --save, where it is already saved (a
    finished run restarted must not put that complete checkpoint at risk by saving it again); else None."""
    cfg = run.train_cfg
    same = cfg.save and cfg.load and os.path.realpath(cfg.save) == os.path.realpath(cfg.load)
    return run.iteration if run.iteration and same else None


def _evaluate_if_due(run: Run, record: dict, collector: ManualGarbageCollection) -> None:
    """Every --eval-interval steps and at the last: the validation loss into the step's record."""
    if run.iteration % run.train_cfg.eval_interval == 0 or run.iteration == run.train_cfg.train_iters:
        collector.around_evaluation()
        evaluation = evaluate(run)
        collector.around_evaluation()
        if evaluation is not None:
            record.update(evaluation)


def train(run: Run) -> List[dict]:
    """Train from run.iteration to --train-iters; returns the per-iteration records."""
    cfg, g = run.train_cfg, run.grid
    write_resolved_config(run, log_folders(cfg))
    logger = Logger(run.model_cfg, cfg, rank=g.rank, world_size=g.world_size, tp=g.tp_size, device=run.device,
                    half_precision=run.opt_cfg.bf16 or run.opt_cfg.fp16, start_iteration=run.iteration,
                    writers=build_writers(cfg, g.rank, resolved_config(run.configs())))
    profiler, collector = StepProfiler(cfg, g.rank), ManualGarbageCollection(cfg)
    exit_signal = ExitSignal(cfg.exit_signal_handler)
    parameters = flops.count_parameters(run.model_cfg, tp=g.tp_size)
    print_rank0(f"training {parameters:,} parameters on {g.world_size} rank(s) "
                f"(TP={g.tp_size} PP={g.pp_size} DP={g.dp_size} CP={g.cp_size}), global batch "
                f"{cfg.global_batch_size} = {run.num_microbatches} micro-batches x {cfg.micro_batch_size} x DP "
                f"{g.dp_size}, {cfg.train_iters} iterations")
    saved_at, skipped_in_a_row = _saved_already(run), 0
    try:
        while run.iteration < cfg.train_iters:
            start, cpu_start = time.perf_counter(), time.process_time()
            upcoming = run.iteration + 1
            last = upcoming == cfg.train_iters or (cfg.exit_interval and upcoming % cfg.exit_interval == 0)
            timeline = Timeline(pp_rank=g.pp_rank) if cfg.timeline and last else None
            profiler.before_step(upcoming)
            record = train_step(run, timeline)
            seconds = time.perf_counter() - start
            # This process's CPU time in the step: below the wall time by what it waited (on peers, or
            # for a core other processes held).
            record["cpu_ms"] = (time.process_time() - cpu_start) * 1e3
            profiler.after_step(upcoming, last=upcoming == cfg.train_iters)
            if timeline is not None:
                step_microbatches = record["global_batch_size"] // (cfg.micro_batch_size * g.dp_size)
                record["bubble_fraction"] = draw_timeline(run, timeline, step_microbatches)
            collector.after_step(run.iteration)
            _evaluate_if_due(run, record, collector)
            run.history.append(logger.record(record, seconds))
            skipped_in_a_row = skipped_in_a_row + 1 if record["grad_norm"] is None else 0
            if skipped_in_a_row >= cfg.max_skipped_iterations_in_a_row:
                raise TrainingDiverged(
                    f"{skipped_in_a_row} optimizer steps in a row (to iteration {run.iteration}) were skipped for "
                    f"inf/nan gradients, loss scale now {record['loss_scale']:g}; the run diverged: lower --lr or "
                    f"check the data (the limit is --max-skipped-iterations-in-a-row)")
            if cfg.save and cfg.save_interval and run.iteration % cfg.save_interval == 0:
                save(run)
                saved_at = run.iteration
            if cfg.exit_interval and run.iteration % cfg.exit_interval == 0:
                print_rank0(f"exiting at iteration {run.iteration} (--exit-interval {cfg.exit_interval})")
                break
            reason = exit_reason(cfg, run.started_at, run.device, exit_signal)
            if reason is not None:
                print_rank0(f"exiting at iteration {run.iteration} ({reason})")
                break
        if cfg.save and saved_at != run.iteration:
            save(run)
    finally:
        logger.close()
        collector.close()
    return run.history


def pretrain(argv=None) -> List[dict]:
    """Set up and train from Megatron-style flags; returns the per-iteration records."""
    started_distributed = not dist.is_initialized()
    try:
        run = setup(argv)
        return train(run)
    finally:
        shut_down_distributed(destroy_default=started_distributed)
