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
