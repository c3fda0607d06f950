"""Settings as dataclasses that validate themselves, filled from Megatron-LM-compatible flags.

Each field is named after its Megatron flag (``--num-query-groups`` -> ``num_query_groups``).
Validation happens in ``__post_init__`` and says what would work, so a bad run is refused before
any process waits on another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    """The transformer's shape and flavour (GPT by default; LLaMA-style with the switches below)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None      # grouped-query attention; None = one group per head
    ffn_hidden_size: Optional[int] = None       # None = 4 * hidden_size
    seq_length: int = 64
    max_position_embeddings: Optional[int] = None  # None = seq_length
    vocab_size: int = 256                       # the tokenizer's size; padded_vocab_size adds padding
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    normalization: str = "LayerNorm"            # or "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    init_method_std: float = 0.02
    seed: int = 1234                            # weights are drawn from (seed, parameter name)
    # Parallelism that changes what a layer computes locally.
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Activation recompute.
    recompute_granularity: Optional[str] = None  # None, "full" or "selective"
    recompute_method: Optional[str] = None       # "uniform" or "block" (with "full")
    recompute_num_layers: Optional[int] = None

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                             f"--num-query-groups {self.num_query_groups}")
        tp = self.tensor_model_parallel_size
        if self.num_query_groups % tp:
            raise ValueError(f"--num-query-groups {self.num_query_groups} is not divisible by "
                             f"--tensor-model-parallel-size {tp}; use a TP size that divides it")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        if self.sequence_parallel and self.seq_length % tp:
            raise ValueError(f"--sequence-parallel needs --seq-length {self.seq_length} divisible by "
                             f"--tensor-model-parallel-size {tp}")
        if self.seq_length > self.max_position_embeddings and self.position_embedding_type == "learned_absolute":
            raise ValueError(f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                             f"{self.max_position_embeddings}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization {self.normalization!r}: choose LayerNorm or RMSNorm")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"--position-embedding-type {self.position_embedding_type!r}: "
                             f"choose learned_absolute or rope")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity {self.recompute_granularity!r}: choose full or selective")
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class OptimizerConfig:
    """AdamW, clipping, mixed precision and gradient reduction (Megatron flag names)."""

    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0                      # 0 disables clipping
    bf16: bool = False
    fp16: bool = False
    loss_scale: Optional[float] = None          # constant scale for fp16; None = dynamic
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    use_distributed_optimizer: bool = False     # ZeRO-1
    overlap_grad_reduce: bool = False
    ddp_bucket_size: Optional[int] = None       # elements per bucket; None = one bucket per 40M elements

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive; choose one")
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"--lr {self.lr} and --min-lr {self.min_lr} must be non-negative")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad {self.clip_grad} must be >= 0 (0 disables clipping)")


@dataclass
class ParallelConfig:
    """How the world is cut: TP x CP x DP x PP (DP derived from the world size), and the schedule."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # alternative way to ask for virtual stages
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    pipeline_schedule: Optional[str] = None     # None = the default for (pp, virtual pp); see schedules.py
    distributed_timeout_minutes: float = 10.0
    world_size: int = 1                         # not a flag: WORLD_SIZE under torchrun, else 1

    def __post_init__(self):
        for flag, value in (("--tensor-model-parallel-size", self.tensor_model_parallel_size),
                            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
                            ("--context-parallel-size", self.context_parallel_size)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        model_ranks = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        if self.world_size % model_ranks:
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size {self.pipeline_model_parallel_size}"
                f" x --context-parallel-size {self.context_parallel_size} = {model_ranks}; launch a multiple of "
                f"{model_ranks} ranks or choose sizes whose product divides {self.world_size}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and self.num_layers_per_virtual_pipeline_stage is not None:
            raise ValueError("give either --virtual-pipeline-model-parallel-size or "
                             "--num-layers-per-virtual-pipeline-stage, not both")
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

    data_path: Optional[list] = None            # Megatron style: [prefix] or [weight prefix weight prefix ...]
    split: str = "969,30,1"                     # train,valid,test proportions
    mock_data: bool = False
    data_cache_path: Optional[str] = None
    tokenizer_type: Optional[str] = None        # GPT2BPETokenizer, HuggingFaceTokenizer, TikTokenizer, NullTokenizer
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None

    def __post_init__(self):
        if not self.mock_data and not self.data_path:
            raise ValueError("--data-path is required (a .bin/.idx prefix from tools/preprocess_data.py); "
                             "or pass --mock-data for synthetic tokens")
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"--split {self.split!r} must be comma-separated numbers, e.g. 969,30,1") from None
        if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--split {self.split!r} must be up to three non-negative numbers with a positive "
                             f"sum, e.g. 969,30,1")
        if self.tokenizer_type == "GPT2BPETokenizer" and not (self.vocab_file and self.merge_file):
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        if self.tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") and not self.tokenizer_model:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model")


@dataclass
class TrainingConfig:
    """Batches, iterations, the learning-rate schedule, checkpoints, evaluation and logging."""

    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None     # None = micro_batch_size x data-parallel size
    train_iters: int = 100
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None        # None = train_iters
    lr_decay_style: str = "linear"              # linear, cosine or constant (Megatron's default is linear)
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 100
    log_json: Optional[str] = None
    exit_interval: Optional[int] = None         # stop (after saving) once iteration % exit_interval == 0
    timeline: Optional[str] = None              # PNG path: draw the pipeline timeline of the last iteration
    peak_tflops: Optional[float] = None         # per-device peak for MFU; None = scaling.flops default

    def __post_init__(self):
        for flag, value in (("--micro-batch-size", self.micro_batch_size), ("--train-iters", self.train_iters),
                            ("--log-interval", self.log_interval), ("--eval-interval", self.eval_interval)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be at least 1, got {self.global_batch_size}")
        if self.eval_iters < 0 or self.lr_warmup_iters < 0:
            raise ValueError(f"--eval-iters {self.eval_iters} and --lr-warmup-iters {self.lr_warmup_iters} "
                             f"must be non-negative")
        if self.lr_decay_style not in ("linear", "cosine", "constant"):
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r}: choose linear, cosine or constant")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        if self.lr_warmup_iters > self.lr_decay_iters:
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} exceeds --lr-decay-iters "
                             f"{self.lr_decay_iters}; shorten the warm-up or lengthen the decay")
        if self.save_interval is not None and self.save is None:
            raise ValueError(f"--save-interval {self.save_interval} needs --save DIR")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be at least 1, got {self.save_interval}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {self.peak_tflops}")

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per rank per step: global batch / (micro batch x DP), refused unless exact."""
        check_batch_sizes(self.global_batch_size, self.micro_batch_size, data_parallel_size)
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> None:
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        suggestion = max(per_step, round(global_batch_size / per_step) * per_step)
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} x "
            f"data-parallel size {data_parallel_size} = {per_step}; try {suggestion}")


# --------------------------------------------------------------------------------------------------
# The command line.  Every field of the dataclasses above is a flag named after it
# (num_layers <-> --num-layers), so the mapping stays 1:1 without a hand-written table; a few flags
# differ from that rule because Megatron spells them differently, listed here.
_FLAG_EXCEPTIONS = {
    # field: (flag, argparse kwargs)
    "add_bias_linear": ("--disable-bias-linear", {"action": "store_false"}),
    "data_path": ("--data-path", {"nargs": "+"}),
}
# Fields that are not flags: derived or copied from another config.
_NOT_FLAGS = {
    ModelConfig: {"tensor_model_parallel_size", "sequence_parallel"},  # filled from ParallelConfig
    ParallelConfig: {"world_size"},                                   # from the launcher
}
_CHOICES = {
    "normalization": ("LayerNorm", "RMSNorm"),
    "position_embedding_type": ("learned_absolute", "rope"),
    "lr_decay_style": ("linear", "cosine", "constant"),
    "recompute_granularity": ("full", "selective"),
    "recompute_method": ("uniform", "block"),
    "pipeline_schedule": ("gpipe", "1f1b", "interleaved", "zb-h1"),   # megalite/parallel/pipeline/schedules.py
    "tokenizer_type": ("GPT2BPETokenizer", "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer"),
}
_CONFIG_CLASSES = ("ModelConfig", "ParallelConfig", "OptimizerConfig", "DataConfig", "TrainingConfig")


class _ArgumentParser(__import__("argparse").ArgumentParser):
    """argparse that raises ValueError instead of exiting, so callers (and tests) decide how to report."""

    def error(self, message):
        raise ValueError(message)


def _config_classes():
    g = globals()
    return [g[name] for name in _CONFIG_CLASSES]


def _argparse_type(annotation: str):
    # Annotations are strings (from __future__ import annotations): "Optional[int]", "float", "bool".
    base = annotation.replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "str": str, "bool": bool, "list": str}[base]


def build_parser():
    from dataclasses import MISSING, fields

    parser = _ArgumentParser(prog="pretrain_gpt.py", description="Train a GPT with megalite (Megatron-LM flags).")
    seen = {}
    for cls in _config_classes():
        group = parser.add_argument_group(cls.__name__)
        for f in fields(cls):
            if f.name in _NOT_FLAGS.get(cls, ()):
                continue
            if f.name in seen:
                raise RuntimeError(f"field {f.name} is in both {seen[f.name]} and {cls.__name__}")
            seen[f.name] = cls.__name__
            flag, kwargs = _FLAG_EXCEPTIONS.get(f.name, ("--" + f.name.replace("_", "-"), {}))
            kwargs = dict(kwargs, dest=f.name, default=MISSING)
            kind = _argparse_type(f.type)
            if "action" not in kwargs and "nargs" not in kwargs:
                if kind is bool:
                    kwargs["action"] = "store_true"
                else:
                    kwargs["type"] = kind
                    if f.name in _CHOICES:
                        kwargs["choices"] = _CHOICES[f.name]
            default = f.default if f.default is not MISSING else None
            kwargs["help"] = f"(default: {default})"
            group.add_argument(flag, **kwargs)
    # A switch Megatron has that only gates another flag: --num-query-groups counts only with it.
    parser.add_argument("--group-query-attention", action="store_true", dest="group_query_attention",
                        default=False, help="use --num-query-groups key/value groups (grouped-query attention)")
    return parser


def parse_args(argv=None, world_size: Optional[int] = None):
    """Parse Megatron-style flags into ``(model, parallel, optimizer, data, training)`` configs.

    Raises ValueError (one line, naming the flag and the fix) on a bad value or combination.
    ``world_size`` defaults to $WORLD_SIZE (set by torchrun) or 1.
    """
    import os
    import sys
    from dataclasses import MISSING, fields

    argv = sys.argv[1:] if argv is None else list(argv)
    ns = vars(build_parser().parse_args(argv))
    gqa = ns.pop("group_query_attention")
    given = {k: v for k, v in ns.items() if v is not MISSING}
    if gqa and given.get("num_query_groups") is None:
        raise ValueError("--group-query-attention needs --num-query-groups N")
    if not gqa and given.get("num_query_groups") is not None:
        raise ValueError(f"--num-query-groups {given['num_query_groups']} takes effect only with "
                         f"--group-query-attention (as in Megatron-LM); add that flag")

    def pick(cls, **extra):
        names = {f.name for f in fields(cls)} - set(extra)
        return cls(**{k: v for k, v in given.items() if k in names}, **extra)

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = pick(ParallelConfig, world_size=world_size)
    model = pick(ModelConfig, tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                 sequence_parallel=parallel.sequence_parallel)
    optimizer = pick(OptimizerConfig)
    data = pick(DataConfig)
    training = pick(TrainingConfig)
    validate_together(model, parallel, optimizer, data, training)
    return model, parallel, optimizer, data, training


def validate_together(model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig,
                      data: DataConfig, training: TrainingConfig) -> None:
    """Checks that need more than one config; fills the defaults that depend on another config."""
    dp = parallel.data_parallel_size
    if training.global_batch_size is None:
        training.global_batch_size = training.micro_batch_size * dp
    check_batch_sizes(training.global_batch_size, training.micro_batch_size, dp)
    if model.tensor_model_parallel_size != parallel.tensor_model_parallel_size or \
            model.sequence_parallel != parallel.sequence_parallel:
        raise ValueError("ModelConfig and ParallelConfig disagree on tensor-model-parallel-size/sequence-parallel")
    pp = parallel.pipeline_model_parallel_size
    per_virtual = parallel.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        if model.num_layers % (pp * per_virtual):
            raise ValueError(f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size "
                             f"{pp} x --num-layers-per-virtual-pipeline-stage {per_virtual}")
        parallel.virtual_pipeline_model_parallel_size = model.num_layers // (pp * per_virtual)
        parallel.num_layers_per_virtual_pipeline_stage = None
        if parallel.virtual_pipeline_model_parallel_size > 1 and pp == 1:
            raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    uneven = parallel.decoder_first_pipeline_num_layers is not None or \
        parallel.decoder_last_pipeline_num_layers is not None
    stages = pp * (parallel.virtual_pipeline_model_parallel_size or 1)
    if not uneven and model.num_layers % stages:
        raise ValueError(f"--num-layers {model.num_layers} does not split into --pipeline-model-parallel-size {pp}"
                         f" x virtual size {parallel.virtual_pipeline_model_parallel_size or 1} = {stages} equal "
                         f"stages; use a multiple of {stages} layers")
    if data.data_path and not data.mock_data and data.tokenizer_type is None:
        raise ValueError("--data-path needs --tokenizer-type (and its files) so the vocabulary size is known")
