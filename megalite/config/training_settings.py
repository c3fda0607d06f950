"""TrainingConfig: batches, iterations, the learning-rate schedule, checkpoints, evaluation, logging and
profiling -- the settings of the loop (``megalite/training/``), declared as in ``settings.py`` (each field
is its flag) and re-exported from there."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

from megalite.config.flags import check_fields, flag

__all__ = ["TrainingConfig", "DecayStyle", "check_batch_sizes", "step_schedule"]

DecayStyle = Literal["linear", "cosine", "constant"]


@dataclass
class TrainingConfig:
    """Batches, iterations, the learning-rate schedule, checkpoints, evaluation, logging and profiling.

    The schedule counts iterations (``--train-iters``, ``--lr-*-iters``) or, Megatron's other way,
    samples (``--train-samples``, ``--lr-*-samples``); ``lr_schedule_steps`` gives it in its unit.
    """

    micro_batch_size: int = flag(1, "samples per micro-batch on each data-parallel rank", at_least=1)
    global_batch_size: Optional[int] = flag(None, "samples per optimizer step; default micro batch x DP", at_least=1)
    rampup_batch_size: Optional[List[int]] = flag(None, "START INCR SAMPLES: grow the global batch from START by INCR "
                                                        "over the first SAMPLES samples")
    step_batch_size_schedule: Optional[str] = flag(
        None, "'TOKENS:SIZE TOKENS:SIZE ...': the global batch is SIZE once TOKENS tokens are consumed (suffixes K, "
              "M, B, T; the first at 0); the last SIZE is the global batch size")
    calculate_per_token_loss: bool = flag(False, "normalize the loss by the valid tokens of the whole global batch "
                                                 "(all micro-batches and data-parallel ranks), not per micro-batch")
    train_iters: Optional[int] = flag(None, "optimizer steps to train for; default 100", at_least=1)
    train_samples: Optional[int] = flag(None, "samples to train on instead of --train-iters (the learning-rate "
                                              "schedule then counts samples)", at_least=1)
    lr_warmup_iters: int = flag(0, "steps of linear warm-up", at_least=0)
    lr_decay_iters: Optional[int] = flag(None, "steps over which the learning rate decays; default --train-iters",
                                         at_least=1)
    lr_warmup_samples: int = flag(0, "samples of linear warm-up (with --train-samples)", at_least=0)
    lr_decay_samples: Optional[int] = flag(None, "samples over which the learning rate decays (with --train-samples)"
                                                 "; default --train-samples", at_least=1)
    lr_warmup_fraction: Optional[float] = flag(None, "warm-up as a fraction of the decay, instead of a count",
                                               at_least=0, at_most=1)
    lr_decay_style: DecayStyle = flag("linear", "shape of the decay")
    save: Optional[str] = flag(None, "folder to save checkpoints to")
    load: Optional[str] = flag(None, "folder to resume from (may equal --save)")
    save_interval: Optional[int] = flag(None, "save every this many steps (and at the end)", at_least=1)
    finetune: bool = flag(False, "with --load: take only the weights; start at iteration 0 with a fresh optimizer, "
                                 "schedule and data position")
    use_checkpoint_args: bool = flag(False, "with --load: take the model's flags from the checkpoint (flags on the "
                                            "command line still win)")
    no_load_optim: bool = flag(False, "with --load: take the weights and position, not the optimizer state")
    no_load_rng: bool = flag(False, "with --load: do not restore the RNG states (a missing RNG file is then no error)")
    eval_interval: int = flag(1000, "evaluate every this many steps (and at the end)", at_least=1)
    eval_iters: int = flag(10, "global batches per evaluation (0: none)", at_least=0)
    exit_interval: Optional[int] = flag(None, "stop (after saving) once the step is a multiple of this", at_least=1)
    exit_duration_in_mins: Optional[float] = flag(None, "save and stop once the run has lasted this many minutes",
                                                  above=0)
    exit_signal_handler: bool = flag(False, "on SIGTERM (a scheduler's preemption notice), save at the end of the "
                                            "current iteration and exit 0")
    max_skipped_iterations_in_a_row: int = flag(10, "stop with an error after this many optimizer steps in a row "
                                                    "skipped for inf/nan gradients (fp16)", at_least=1)
    manual_gc: bool = flag(False, "turn Python's automatic garbage collection off and collect between steps (every "
                                  "--manual-gc-interval) and around evaluations, at the same point on every rank")
    manual_gc_interval: int = flag(0, "with --manual-gc: collect every this many steps (0: only around evaluations)",
                                   at_least=0)
    empty_unused_memory_level: Literal[0, 1, 2] = flag(0, "return CUDA's cached unused memory: 1 after each forward/"
                                                          "backward, 2 also after each optimizer step")
    log_interval: int = flag(100, "print a line every this many steps", at_least=1)
    log_json: Optional[str] = flag(None, "also write one JSON record per step to this file")
    log_throughput: bool = flag(False, "add the TFLOP/s per device to the log line, as Megatron does")
    tensorboard_dir: Optional[str] = flag(None, "write TensorBoard scalars (loss, learning rate, grad norm, loss "
                                                "scale, throughput, MFU, memory, eval) here")
    log_validation_ppl_to_tensorboard: bool = flag(False, "also write the validation perplexity to TensorBoard (and "
                                                          "Weights & Biases)")
    wandb_project: Optional[str] = flag(None, "log the same scalars to this Weights & Biases project")
    wandb_exp_name: Optional[str] = flag(None, "the Weights & Biases run name")
    wandb_save_dir: Optional[str] = flag(None, "local folder of the Weights & Biases run; default next to "
                                               "--save or --tensorboard-dir")
    timeline: Optional[str] = flag(None, "PNG path: draw the pipeline timeline of the last step")
    peak_tflops: Optional[float] = flag(None, "per-device peak TFLOP/s for MFU; default by device and precision",
                                        above=0)
    compile: bool = flag(False, "torch.compile each transformer layer (pipeline chunks and recompute keep working)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = flag(
        "inductor", "the torch.compile backend of --compile (aot_eager: trace without generating kernels)")
    profile: bool = flag(False, "profile steps --profile-step-start to --profile-step-end: alone, Megatron's nsys "
                                "capture (the CUDA profiler API; needs CUDA), else --use-pytorch-profiler's trace")
    use_pytorch_profiler: bool = flag(False, "with --profile: record a torch.profiler trace per rank")
    profile_step_start: int = flag(10, "first profiled step", at_least=1)
    profile_step_end: int = flag(12, "the step at which profiling stops (not profiled)", at_least=1)
    profile_ranks: Optional[List[int]] = flag(None, "global ranks to profile; default rank 0")
    profile_dir: Optional[str] = flag(None, "where traces go; default --tensorboard-dir, else ./profile")

    def __post_init__(self):
        check_fields(self)
        self._check_step_schedule()
        sample_based = self.train_samples is not None
        if sample_based and self.train_iters is not None:
            raise ValueError("give --train-iters or --train-samples, not both")
        if not sample_based and self.train_iters is None:
            self.train_iters = 100
        given = {"--lr-warmup-iters": self.lr_warmup_iters > 0, "--lr-decay-iters": self.lr_decay_iters is not None,
                 "--lr-warmup-samples": self.lr_warmup_samples > 0,
                 "--lr-decay-samples": self.lr_decay_samples is not None}
        for name, is_given in given.items():
            if is_given and name.endswith("samples") != sample_based:
                needs = "--train-samples" if sample_based is False else "--train-iters"
                raise ValueError(f"{name} goes with {needs}; count the schedule in one unit")
        if self.lr_warmup_fraction is not None and (self.lr_warmup_iters or self.lr_warmup_samples):
            raise ValueError("give --lr-warmup-fraction or a warm-up count, not both")
        if not sample_based and self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        if sample_based and self.lr_decay_samples is None:
            self.lr_decay_samples = self.train_samples
        warmup, decay = self.lr_schedule_steps()
        if warmup > decay:
            unit = "samples" if sample_based else "iters"
            raise ValueError(f"--lr-warmup-{unit} {warmup} exceeds --lr-decay-{unit} {decay}; shorten the warm-up "
                             f"or lengthen the decay")
        if self.save_interval is not None and self.save is None:
            raise ValueError(f"--save-interval {self.save_interval} needs --save DIR")
        if self.profile_step_end <= self.profile_step_start:
            raise ValueError(f"--profile-step-end {self.profile_step_end} must come after --profile-step-start "
                             f"{self.profile_step_start}")
        if self.manual_gc_interval and not self.manual_gc:
            raise ValueError(f"--manual-gc-interval {self.manual_gc_interval} takes effect only with --manual-gc; "
                             f"add it")
        if self.wandb_exp_name is not None and self.wandb_project is None:
            raise ValueError("--wandb-exp-name needs --wandb-project")

    def _check_step_schedule(self) -> None:
        """Megatron's rules: not with a ramp; --global-batch-size only as the schedule's last size (Megatron refuses
        it outright; its own GPT-3 175B script gives both, equal)."""
        if self.step_batch_size_schedule is None:
            return
        sizes = [size for _, size in step_schedule(self.step_batch_size_schedule)]
        if self.rampup_batch_size is not None:
            raise ValueError("give --step-batch-size-schedule or --rampup-batch-size, not both")
        if self.global_batch_size is not None and self.global_batch_size != sizes[-1]:
            raise ValueError(f"--global-batch-size {self.global_batch_size} differs from the last size {sizes[-1]} of "
                             f"--step-batch-size-schedule, which sets it; drop --global-batch-size")
        self.global_batch_size = sizes[-1]

    def largest_global_batch_size(self) -> int:
        """The most samples a step takes (a step schedule may pass through larger sizes than its last)."""
        if self.step_batch_size_schedule is None:
            return self.global_batch_size
        return max(size for _, size in step_schedule(self.step_batch_size_schedule))

    def lr_schedule_steps(self) -> Tuple[int, int]:
        """(warm-up, decay) length of the learning-rate schedule, in samples with --train-samples, else steps."""
        decay = self.lr_decay_samples if self.train_samples is not None else self.lr_decay_iters
        count = self.lr_warmup_samples if self.train_samples is not None else self.lr_warmup_iters
        warmup = round(self.lr_warmup_fraction * decay) if self.lr_warmup_fraction is not None else count
        return warmup, decay

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per rank in a full step: global batch / (micro batch x DP), refused unless exact."""
        check_batch_sizes(self.global_batch_size, self.micro_batch_size, data_parallel_size)
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> None:
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        suggestion = max(per_step, round(global_batch_size / per_step) * per_step)
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} x "
            f"data-parallel size {data_parallel_size} = {per_step}; try {suggestion}")


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def step_schedule(text: str) -> List[Tuple[int, int]]:
    """``--step-batch-size-schedule``'s (tokens, global batch size) pairs, in order of tokens.

    Entries ``THRESHOLD:SIZE`` are separated by spaces or commas; a number may end in K, M, B or T
    (10^3 ... 10^12) and be fractional before it (2.4B).  The first threshold is 0, thresholds rise
    strictly, sizes are positive (Megatron-LM's format)::

        >>> step_schedule("0:16 2.4B:320, 4.8B:624")
        [(0, 16), (2400000000, 320), (4800000000, 624)]
    """
    entries = text.replace(",", " ").split()
    if not entries:
        raise ValueError("--step-batch-size-schedule is empty; give TOKENS:SIZE pairs such as '0:16 1B:32'")
    pairs = []
    for entry in entries:
        threshold, _, size = entry.partition(":")
        try:
            pairs.append((_count(threshold), _count(size)))
        except ValueError:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} is not TOKENS:SIZE (numbers, with an "
                             f"optional K/M/B/T suffix), e.g. '0:16 2.4B:320'") from None
    pairs.sort()
    if pairs[0][0] != 0:
        raise ValueError(f"--step-batch-size-schedule starts at {pairs[0][0]} tokens; its first entry must be at 0")
    for (before, _), (after, _) in zip(pairs, pairs[1:]):
        if after == before:
            raise ValueError(f"--step-batch-size-schedule gives {before} tokens twice; keep one size per threshold")
    for _, size in pairs:
        if size < 1:
            raise ValueError(f"--step-batch-size-schedule size {size} must be at least 1")
    return pairs


def _count(text: str) -> int:
    text = text.strip().upper()
    multiplier = _SUFFIXES.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in _SUFFIXES else text)
    if not math.isfinite(number) or number < 0:
        raise ValueError(text)
    return int(number * multiplier)
