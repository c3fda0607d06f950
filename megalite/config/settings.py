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
from megalite.config.training_settings import DecayStyle, TrainingConfig, check_batch_sizes
from megalite.parallel.pipeline.orders import PipelineSchedule

# Choices that the code reading them imports from here (data/tokenizer.py; the decay styles from
# training_settings.py, re-exported); the pipeline schedules live with their orders.
ShardingStrategy = Literal["no_shard", "optim", "optim_grads", "optim_grads_params"]
TokenizerType = Literal["GPT2BPETokenizer", "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer"]

__all__ = ["ModelConfig", "OptimizerConfig", "ShardingStrategy", "ParallelConfig", "DataConfig", "TrainingConfig",
           "CONFIG_CLASSES", "DecayStyle", "TokenizerType",
           "check_batch_sizes", "saved_model_fields"]


@dataclass
class OptimizerConfig:
    """AdamW, clipping, mixed precision and gradient reduction (Megatron flag names)."""

    lr: float = flag(3e-4, "peak learning rate", at_least=0)
    min_lr: float = flag(0.0, "learning rate at the end of the decay", at_least=0)
    decoupled_lr: Optional[float] = flag(None, "peak learning rate of the input embedding and the output layer, on "
                                               "the same warm-up and decay (default --lr)", at_least=0)
    decoupled_min_lr: Optional[float] = flag(None, "with --decoupled-lr: their rate at the end of the decay (default "
                                                   "--min-lr)", at_least=0)
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
    grad_reduce_in_bf16: bool = flag(False, "with --bf16: reduce gradients over data parallelism in bfloat16 (fp32 "
                                            "accumulation stays)")
    use_distributed_optimizer: bool = flag(False, "shard fp32 masters and Adam moments over data parallelism "
                                                  "(ZeRO-1)")
    data_parallel_sharding_strategy: Optional[ShardingStrategy] = flag(
        None, "what data parallelism shards over DP x CP: nothing, optimizer state (ZeRO-1), also gradients "
              "(ZeRO-2), also parameters (ZeRO-3 / FSDP); default optim with --use-distributed-optimizer or "
              "--use-megatron-fsdp / --use-torch-fsdp2 (docs/sharded_data_parallel.md)")
    use_megatron_fsdp: bool = flag(False, "fully sharded data parallelism with megalite's own buckets; "
                                          "--data-parallel-sharding-strategy says how much (default "
                                          "optim_grads_params)")
    use_torch_fsdp2: bool = flag(False, "Megatron's switch for FSDP2: megalite shards the same way "
                                        "(optim_grads_params) with its own buckets (docs/sharded_data_parallel.md)")
    overlap_grad_reduce: bool = flag(False, "reduce gradient buckets during backward")
    overlap_param_gather: bool = flag(False, "all-gather sharded parameters while the model computes: ZeRO-3 the "
                                             "next unit's, ZeRO-1/2 the step's update into the next forward")
    ddp_bucket_size: Optional[int] = flag(None, "elements per gradient bucket; default 40M", at_least=1)

    def __post_init__(self):
        check_fields(self)
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive; choose one")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ValueError(f"--decoupled-min-lr {self.decoupled_min_lr} takes effect only with --decoupled-lr; "
                             f"add it")
        if self.decoupled_lr is not None and self.decoupled_lr_range()[1] > self.decoupled_lr:
            raise ValueError(f"the decoupled minimum {self.decoupled_lr_range()[1]} (--decoupled-min-lr, default "
                             f"--min-lr) is above --decoupled-lr {self.decoupled_lr}")
        if self.grad_reduce_in_bf16 and not self.bf16:
            raise ValueError("--grad-reduce-in-bf16 takes effect only with --bf16 (as in Megatron-LM); add --bf16")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ValueError(f"--min-loss-scale {self.min_loss_scale} is above --initial-loss-scale "
                             f"{self.initial_loss_scale}")
        self._check_sharding()

    def _check_sharding(self) -> None:
        explicit = self.data_parallel_sharding_strategy
        if self.use_torch_fsdp2 and self.use_megatron_fsdp:
            raise ValueError("--use-torch-fsdp2 and --use-megatron-fsdp are exclusive (as in Megatron-LM); keep one")
        if self.use_torch_fsdp2 and explicit not in (None, "optim_grads_params"):
            raise ValueError(f"--use-torch-fsdp2 shards parameters, gradients and optimizer state; it cannot "
                             f"take --data-parallel-sharding-strategy {explicit}: drop one of them")
        if explicit == "no_shard" and self.use_distributed_optimizer:
            raise ValueError("--use-distributed-optimizer shards the optimizer state, "
                             "--data-parallel-sharding-strategy no_shard shards nothing; drop one of them")
        if self.overlap_param_gather and self.sharding_strategy() == "no_shard":
            raise ValueError("--overlap-param-gather overlaps the all-gather of sharded parameters; add "
                             "--use-distributed-optimizer or a --data-parallel-sharding-strategy other than no_shard")

    def sharding_strategy(self) -> str:
        """The strategy the flags ask for (parallel/grad_buffer.py lists what each keeps whole)."""
        if self.data_parallel_sharding_strategy is not None:
            return self.data_parallel_sharding_strategy
        if self.use_megatron_fsdp or self.use_torch_fsdp2:
            return "optim_grads_params"
        return "optim" if self.use_distributed_optimizer else "no_shard"

    def shards_optimizer(self) -> bool:
        return self.sharding_strategy() != "no_shard"

    def decoupled_lr_range(self) -> Optional[Tuple[float, float]]:
        """(peak, end) rate of the embedding and output layer with --decoupled-lr, else None (Megatron's default
        end is --min-lr)."""
        if self.decoupled_lr is None:
            return None
        return self.decoupled_lr, self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr


@dataclass
class ParallelConfig:
    """How the world is cut: TP x CP x DP x PP (DP derived from the world size), and the schedule."""

    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks (TP)", at_least=1)
    pipeline_model_parallel_size: int = flag(1, "pipeline stages (PP)", at_least=1)
    context_parallel_size: int = flag(1, "context-parallel ranks (CP)", at_least=1)
    expert_model_parallel_size: int = flag(1, "expert-parallel ranks (EP): the experts of each MoE layer split "
                                              "over this many data-parallel ranks", at_least=1)
    expert_tensor_parallel_size: Optional[int] = flag(
        None, "tensor-parallel ranks of each expert: 1, each expert whole on one rank (the TP ranks serve as more "
              "expert-parallel and expert-data-parallel ranks), or TP, each expert's ffn split over the TP group as "
              "a dense MLP is; default 1", at_least=1)
    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = flag(
        "p2p", "how attention reaches the other CP ranks' keys: a K/V ring, one all-gather, or heads exchanged "
               "all-to-all (docs/long_context.md)")
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
        if self.cp_comm_type == "a2a+p2p":
            raise ValueError("--cp-comm-type a2a+p2p (hierarchical context parallelism) is not built; use p2p, "
                             "all_gather or a2a")

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
    mmap_bin_files: bool = flag(True, "read the .bin files with a seek and read per sample instead of memory-mapping "
                                      "them", name="--no-mmap-bin-files")
    num_workers: int = flag(0, "data-loader worker processes reading samples ahead of the step (0: in the training "
                               "process; Megatron's default is 2)", at_least=0)
    data_cache_path: Optional[str] = flag(None, "folder for the sample index cache; default next to the data")
    tokenizer_type: Optional[TokenizerType] = flag(None, "tokenizer the data was made with (its size sets the "
                                                         "vocabulary)")
    vocab_file: Optional[str] = flag(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = flag(None, "GPT-2 BPE merges.txt")
    tokenizer_model: Optional[str] = flag(None, "Hugging Face tokenizer.json or tiktoken encoding name/file")
    reset_position_ids: bool = flag(False, "position ids restart at 0 after each end-of-document token")
    reset_attention_mask: bool = flag(False, "attention stays inside each document of a packed sample")
    eod_mask_loss: bool = flag(False, "no loss where the input token is the end-of-document token")

    def __post_init__(self):
        check_fields(self)
        if not self.mock_data and not self.data_path:
            raise ValueError("--data-path is required (a .bin/.idx prefix from tools/preprocess_data.py); "
                             "or pass --mock-data for synthetic tokens")
        split_weights(self.split)
        if self.data_path:
            parse_blend(self.data_path)
        files = [name for name, value in (("--vocab-file", self.vocab_file), ("--merge-file", self.merge_file),
                                          ("--tokenizer-model", self.tokenizer_model)) if value]
        if files and self.tokenizer_type in (None, "NullTokenizer"):
            # Read by no tokenizer, they would be dropped (the vocabulary then being --vocab-size's).
            fix = "GPT2BPETokenizer for GPT-2's vocab and merges" if "--tokenizer-model" not in files else \
                "HuggingFaceTokenizer or TikTokenizer for a --tokenizer-model"
            raise ValueError(f"{' and '.join(files)} {'is' if len(files) == 1 else 'are'} read only by a "
                             f"--tokenizer-type, and {self.tokenizer_type or 'none'} is given; add --tokenizer-type "
                             f"({fix}), as Megatron-LM requires")
        if self.tokenizer_type == "GPT2BPETokenizer" and not (self.vocab_file and self.merge_file):
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        if self.tokenizer_type in ("HuggingFaceTokenizer", "TikTokenizer") and not self.tokenizer_model:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model")


CONFIG_CLASSES = (ModelConfig, ParallelConfig, OptimizerConfig, DataConfig, TrainingConfig)
