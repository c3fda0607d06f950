"""Settings as dataclasses that validate themselves; each field is also the definition of its flag.

A field is named after its Megatron-LM flag (``--num-query-groups`` <-> ``num_query_groups``) and
declared with ``flags.flag``: its type (``Literal[...]`` lists the allowed values), default, help
sentence and range live together here, and ``megalite/training/arguments.py`` generates the command line from them,
so ``--help`` shows exactly what is declared.  Each class checks its own fields in ``__post_init__``
(the declared choices and ranges, then the rules among its fields) and says what would work; rules that span
two configs are checked once, in ``arguments.validate_together``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

from megalite.config.data_spec import parse_blend, split_weights
from megalite.config.flags import check_fields, flag
from megalite.config.model_settings import ModelConfig, saved_model_fields
from megalite.parallel.pipeline.orders import PipelineSchedule

# Choices that the code reading them imports from here (optim/schedulers.py, data/tokenizer.py);
# the pipeline schedules live with their orders.
DecayStyle = Literal["linear", "cosine", "constant"]
TokenizerType = Literal["GPT2BPETokenizer", "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer"]

__all__ = ["ModelConfig", "OptimizerConfig", "ParallelConfig", "DataConfig", "TrainingConfig", "CONFIG_CLASSES",
           "DecayStyle", "TokenizerType",
           "check_batch_sizes", "saved_model_fields"]


@dataclass
class OptimizerConfig:
    """AdamW, clipping, mixed precision and gradient reduction (Megatron flag names)."""

    lr: float = flag(3e-4, "peak learning rate", at_least=0)
    min_lr: float = flag(0.0, "learning rate at the end of the decay", at_least=0)
    weight_decay: float = flag(0.01, "decoupled weight decay of the matrices (biases and norms get none)", at_least=0)
    adam_beta1: float = flag(0.9, "Adam's first-moment decay", at_least=0, below=1)
    adam_beta2: float = flag(0.999, "Adam's second-moment decay", at_least=0, below=1)
    adam_eps: float = flag(1e-8, "Adam's denominator epsilon", above=0)
    clip_grad: float = flag(1.0, "clip the global gradient norm to this (0 disables clipping)", at_least=0)
    bf16: bool = flag(False, "bfloat16 parameters and activations with fp32 master weights")
    fp16: bool = flag(False, "float16 parameters and activations with fp32 masters and loss scaling")
    loss_scale: Optional[float] = flag(None, "constant fp16 loss scale; default dynamic scaling", above=0)
    initial_loss_scale: float = flag(2.0 ** 32, "first dynamic fp16 loss scale", above=0)
    min_loss_scale: float = flag(1.0, "the dynamic loss scale never falls below this", above=0)
    loss_scale_window: int = flag(1000, "steps without overflow before the dynamic scale doubles", at_least=1)
    hysteresis: int = flag(2, "overflows tolerated before the dynamic scale halves", at_least=1)
    use_distributed_optimizer: bool = flag(False, "shard fp32 masters and Adam moments over data parallelism "
                                                  "(ZeRO-1)")
    overlap_grad_reduce: bool = flag(False, "reduce gradient buckets during backward")
    ddp_bucket_size: Optional[int] = flag(None, "elements per gradient bucket; default 40M", at_least=1)

    def __post_init__(self):
        check_fields(self)
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive; choose one")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(f"--min-loss-scale {self.min_loss_scale} is above --initial-loss-scale "
                             f"{self.initial_loss_scale}")


@dataclass
class ParallelConfig:
    """How the world is cut: TP x CP x DP x PP (DP derived from the world size), and the schedule."""

    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks (TP)", at_least=1)
    pipeline_model_parallel_size: int = flag(1, "pipeline stages (PP)", at_least=1)
    context_parallel_size: int = flag(1, "context-parallel ranks (CP)", at_least=1)
    virtual_pipeline_model_parallel_size: Optional[int] = flag(None, "model chunks per pipeline rank "
                                                                     "(interleaved schedule)", at_least=1)
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(None, "layers per model chunk: another way to set "
                                                                      "the virtual pipeline size", at_least=1)
    decoder_first_pipeline_num_layers: Optional[int] = flag(None, "layers on the first pipeline stage; default an "
                                                                  "even split", at_least=0)
    decoder_last_pipeline_num_layers: Optional[int] = flag(None, "layers on the last pipeline stage; default an "
                                                                 "even split", at_least=0)
    sequence_parallel: bool = flag(False, "split norms and dropout over the TP ranks along the sequence")
    pipeline_schedule: Optional[PipelineSchedule] = flag(None, "pipeline schedule; default 1f1b, or interleaved "
                                                               "with a virtual pipeline")
    distributed_timeout_minutes: float = flag(10.0, "a collective that waits longer fails", above=0)
    distributed_backend: Optional[Literal["nccl", "gloo"]] = flag(None, "collective backend; default nccl on GPUs, "
                                                                        "gloo on CPUs")
    world_size: int = flag(1, "WORLD_SIZE under torchrun, else 1", at_least=1, cli=False)

    def __post_init__(self):
        check_fields(self)
        model_ranks = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        if self.world_size % model_ranks:
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} x --context-parallel-size {self.context_parallel_size} = "
                f"{model_ranks}; launch a multiple of {model_ranks} ranks or choose sizes whose product divides "
                f"{self.world_size}")
        if self.virtual_pipeline_model_parallel_size is not None and \
                self.num_layers_per_virtual_pipeline_stage is not None:
            raise ValueError("give either --virtual-pipeline-model-parallel-size or "
                             "--num-layers-per-virtual-pipeline-stage, not both")
        self.check_virtual_pipeline()

    def check_virtual_pipeline(self) -> None:
        """A virtual pipeline needs pipeline stages (checked again once the virtual size is derived)."""
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size == 1:
            raise ValueError(f"--virtual-pipeline-model-parallel-size {vpp} needs "
                             f"--pipeline-model-parallel-size > 1; drop it or add pipeline stages")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                                   * self.context_parallel_size)


@dataclass
class DataConfig:
    """Where tokens come from: indexed datasets (.bin/.idx prefixes) or deterministic mock tokens."""

    data_path: Optional[List[str]] = flag(None, "a .bin/.idx prefix, or weight prefix weight prefix ... to blend")
    split: str = flag("969,30,1", "train,valid,test proportions")
    mock_data: bool = flag(False, "train on deterministic synthetic tokens instead of --data-path")
    data_impl: Literal["mmap"] = flag("mmap", "indexed-dataset format: Megatron's memory-mapped .bin/.idx (the only "
                                              "one it still has)")
    data_cache_path: Optional[str] = flag(None, "folder for the sample index cache; default next to the data")
    tokenizer_type: Optional[TokenizerType] = flag(None, "tokenizer the data was made with (its size sets the "
                                                         "vocabulary)")
    vocab_file: Optional[str] = flag(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = flag(None, "GPT-2 BPE merges.txt")
    tokenizer_model: Optional[str] = flag(None, "Hugging Face tokenizer.json or tiktoken encoding name/file")

    def __post_init__(self):
        if not self.mock_data and not self.data_path:
            raise ValueError("--data-path is required (a .bin/.idx prefix from tools/preprocess_data.py); "
                             "or pass --mock-data for synthetic tokens")
        split_weights(self.split)
        if self.data_path:
            parse_blend(self.data_path)
        if self.tokenizer_type == "GPT2BPETokenizer" and not (self.vocab_file and self.merge_file):
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        if self.tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") and not self.tokenizer_model:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model")


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
    log_interval: int = flag(100, "print a line every this many steps", at_least=1)
    log_json: Optional[str] = flag(None, "also write one JSON record per step to this file")
    log_throughput: bool = flag(False, "add the TFLOP/s per device to the log line, as Megatron does")
    tensorboard_dir: Optional[str] = flag(None, "write TensorBoard scalars (loss, learning rate, grad norm, loss "
                                                "scale, throughput, MFU, memory, eval) here")
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
    profile: bool = flag(False, "profile steps --profile-step-start to --profile-step-end")
    use_pytorch_profiler: bool = flag(False, "with --profile: record a torch.profiler trace per rank")
    profile_step_start: int = flag(10, "first profiled step", at_least=1)
    profile_step_end: int = flag(12, "the step at which profiling stops (not profiled)", at_least=1)
    profile_ranks: Optional[List[int]] = flag(None, "global ranks to profile; default rank 0")
    profile_dir: Optional[str] = flag(None, "where traces go; default --tensorboard-dir, else ./profile")

    def __post_init__(self):
        check_fields(self)
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
        if self.wandb_exp_name is not None and self.wandb_project is None:
            raise ValueError("--wandb-exp-name needs --wandb-project")

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


CONFIG_CLASSES = (ModelConfig, ParallelConfig, OptimizerConfig, DataConfig, TrainingConfig)


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> None:
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        suggestion = max(per_step, round(global_batch_size / per_step) * per_step)
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} x "
            f"data-parallel size {data_parallel_size} = {per_step}; try {suggestion}")
