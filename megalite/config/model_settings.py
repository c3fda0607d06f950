"""The model's settings: :class:`ModelConfig`, whose fields are the model's flags (see ``settings.py``
for how a field becomes a flag), and how a checkpoint's saved model settings are read back."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, Optional

from megalite.config.flags import check_fields, flag
from megalite.config.moe_settings import MoEFields

__all__ = ["ModelConfig", "saved_model_fields"]


@dataclass
class ModelConfig(MoEFields):
    """The transformer's shape and flavour (GPT by default; LLaMA-style with the switches below; mixture of
    experts with the MoE flags it inherits from config/moe_settings.py)."""

    num_layers: int = flag(2, "transformer layers", at_least=1)
    hidden_size: int = flag(64, "width of the residual stream", at_least=1)
    num_attention_heads: int = flag(4, "attention heads", at_least=1)
    num_query_groups: Optional[int] = flag(None, "key/value groups for grouped-query attention (with "
                                                 "--group-query-attention); default one per head", at_least=1)
    ffn_hidden_size: Optional[int] = flag(None, "MLP width; default 4 x hidden size", at_least=1)
    seq_length: int = flag(64, "tokens per sample", at_least=1)
    max_position_embeddings: Optional[int] = flag(None, "rows of the learned position table; default the "
                                                        "sequence length", at_least=1)
    vocab_size: int = flag(256, "vocabulary size without padding (a tokenizer's size overrides it)", at_least=1)
    make_vocab_size_divisible_by: int = flag(128, "pad the vocabulary to a multiple of this x TP size", at_least=1)
    fixed_padded_vocab_size: Optional[int] = flag(None, "the padded vocabulary itself, instead of rounding up to "
                                                        "--make-vocab-size-divisible-by x TP", at_least=1,
                                                  name="--padded-vocab-size")
    hidden_dropout: float = flag(0.1, "dropout probability after attention, MLP and embedding", at_least=0, below=1)
    attention_dropout: float = flag(0.1, "dropout probability on the attention weights", at_least=0, below=1)
    normalization: Literal["LayerNorm", "RMSNorm"] = flag("LayerNorm", "normalization layer")
    apply_layernorm_1p: bool = flag(False, "store each norm's weight as weight - 1 (zero-centered gamma, "
                                           "initialized to 0; the norm multiplies by 1 + weight)")
    norm_epsilon: float = flag(1e-5, "epsilon added to the variance in the norms", above=0)
    swiglu: bool = flag(False, "SwiGLU MLP (LLaMA) instead of GELU")
    openai_gelu: bool = flag(False, "GELU's tanh approximation, as GPT-2 was trained with (default: exact GELU)")
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = flag("learned_absolute",
                                                                                "position encoding")
    use_rotary_position_embeddings: bool = flag(False, "Megatron's older spelling of --position-embedding-type "
                                                       "rope")
    no_position_embedding: bool = flag(False, "no learned position table: with RoPE nothing changes, otherwise no "
                                              "position encoding at all (--position-embedding-type none)")
    rotary_base: float = flag(10000.0, "RoPE base period", above=0)
    rotary_percent: float = flag(1.0, "fraction of each head's dimensions that RoPE rotates (the rest pass "
                                      "through)", above=0, at_most=1)
    use_rope_scaling: bool = flag(False, "Llama 3.1's frequency-dependent RoPE scaling (low / high frequency "
                                         "factors 1 and 4, 8192 original positions)")
    rope_scaling_factor: float = flag(8.0, "with --use-rope-scaling: how much the long wavelengths are "
                                           "stretched", at_least=1)
    rotary_seq_len_interpolation_factor: Optional[float] = flag(None, "RoPE positions divided by this (linear "
                                                                      "position interpolation)", at_least=1)
    kv_channels: Optional[int] = flag(None, "dimension of each attention head; default hidden size / heads",
                                      at_least=1)
    qk_layernorm: bool = flag(False, "normalize each head's query and key (the model's --normalization) before "
                                     "RoPE and attention")
    add_qkv_bias: bool = flag(False, "a bias on the query/key/value projection, even with --disable-bias-linear")
    untie_embeddings_and_output_weights: bool = flag(False, "give the output layer its own weights instead of "
                                                            "the word embedding's")
    add_bias_linear: bool = flag(True, "drop the biases of every linear layer (LLaMA style)",
                                 name="--disable-bias-linear")
    init_method_std: float = flag(0.02, "standard deviation of the normal weight initialization", at_least=0)
    seed: int = flag(1234, "random seed: weights are drawn from (seed, parameter name)")
    recompute_granularity: Optional[Literal["full", "selective"]] = flag(
        None, "recompute activations in backward: whole layers (full) or attention's core (selective)")
    recompute_method: Optional[Literal["uniform", "block"]] = flag(
        None, "with full recompute: checkpoint spans of --recompute-num-layers (uniform) or only the first "
              "--recompute-num-layers layers of each stage (block)")
    recompute_num_layers: Optional[int] = flag(None, "layers per recompute span / recomputed layers; default 1",
                                               at_least=1)
    checkpoint_activations: bool = flag(False, "Megatron's older name for --recompute-granularity full "
                                               "--recompute-method uniform")
    # Accepted so Megatron's scripts run unchanged: attention always goes through torch's
    # scaled_dot_product_attention, which picks the flash kernel by itself where the device has it.
    use_flash_attn: bool = flag(False, "accepted for Megatron's scripts: attention uses torch's scaled-dot-product "
                                       "attention, which picks flash attention itself where it can")
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] = flag(
        "auto", "accepted for Megatron's scripts; every choice runs torch's scaled-dot-product attention")

    def __post_init__(self):
        check_fields(self)
        if self.checkpoint_activations and self.recompute_granularity is None:
            self.recompute_granularity, self.recompute_method = "full", self.recompute_method or "uniform"
        self._position_embedding_aliases()
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                                 f"{self.num_attention_heads}; give the head dimension with --kv-channels")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                             f"--num-query-groups {self.num_query_groups}")
        if self.seq_length > self.max_position_embeddings and self.position_embedding_type == "learned_absolute":
            raise ValueError(f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                             f"{self.max_position_embeddings}")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ValueError("--recompute-granularity full needs --recompute-method uniform or block")
        self._check_rope()
        self._check_moe()
        if self.fixed_padded_vocab_size is not None and self.fixed_padded_vocab_size < self.vocab_size:
            raise ValueError(f"--padded-vocab-size {self.fixed_padded_vocab_size} is below the vocabulary size "
                             f"{self.vocab_size}; give at least {self.vocab_size} or drop it")

    def _position_embedding_aliases(self) -> None:
        """Megatron's two older switches, turned into --position-embedding-type (and then cleared, so saved
        settings read back without a contradiction).  As in Megatron, --no-position-embedding drops the
        learned table only: beside RoPE (Llama and Qwen configurations give both) it changes nothing."""
        if self.use_rotary_position_embeddings:
            if self.position_embedding_type not in ("learned_absolute", "rope"):
                raise ValueError(f"--use-rotary-position-embeddings contradicts --position-embedding-type "
                                 f"{self.position_embedding_type}; keep one")
            self.position_embedding_type = "rope"
            self.use_rotary_position_embeddings = False
        if self.no_position_embedding:
            if self.position_embedding_type == "learned_absolute":
                self.position_embedding_type = "none"
            self.no_position_embedding = False

    def _check_rope(self) -> None:
        rotated = int(self.kv_channels * self.rotary_percent)
        if self.position_embedding_type == "rope" and (rotated < 2 or rotated % 2):
            raise ValueError(f"--rotary-percent {self.rotary_percent} of the head dimension {self.kv_channels} "
                             f"rotates {rotated} dimensions; RoPE turns pairs: choose a percent that gives an even "
                             f"number")
        rope_only = {"--use-rope-scaling": self.use_rope_scaling, "--rotary-percent": self.rotary_percent != 1.0,
                     "--rotary-seq-len-interpolation-factor": self.rotary_seq_len_interpolation_factor is not None}
        for name, given in rope_only.items():
            if given and self.position_embedding_type != "rope":
                raise ValueError(f"{name} needs --position-embedding-type rope (this model has "
                                 f"{self.position_embedding_type})")

    @property
    def head_dim(self) -> int:
        """--kv-channels: the dimension of each attention head (hidden size / heads unless given)."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by x ``tp`` (Megatron's rule), so
        each of ``tp`` ranks holds the same number of rows of the embedding and the output layer; or
        --padded-vocab-size where given (``check_tensor_parallel`` checks that ``tp`` divides it)."""
        if self.fixed_padded_vocab_size is not None:
            return self.fixed_padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_tensor_parallel(self, tp: int, sequence_parallel: bool = False) -> None:
        """This shape split over ``tp`` ranks: TP must divide the query groups (each rank holds whole groups)
        and the MLP width, and under sequence parallelism the sequence.  The TP size and the SP flag are
        ParallelConfig's: ``arguments.validate_together`` checks the command line, GPTModel its process grid."""
        if self.num_query_groups % tp:
            raise ValueError(f"--num-query-groups {self.num_query_groups} is not divisible by "
                             f"--tensor-model-parallel-size {tp}; use a TP size that divides it")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        if self.fixed_padded_vocab_size is not None and self.fixed_padded_vocab_size % tp:
            raise ValueError(f"--padded-vocab-size {self.fixed_padded_vocab_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp}; each rank holds an equal share of the rows")
        if sequence_parallel and self.seq_length % tp:
            raise ValueError(f"--sequence-parallel needs --seq-length {self.seq_length} divisible by "
                             f"--tensor-model-parallel-size {tp}")

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], **overrides) -> ModelConfig:
        """The ModelConfig of a checkpoint's ``settings["model"]`` (see :func:`saved_model_fields`), with
        ``overrides`` replacing saved fields."""
        return cls(**{**saved_model_fields(saved), **overrides})


# Keys a checkpoint's settings["model"] may hold that are not ModelConfig fields: the TP size and the SP
# flag, which belong to the parallel layout (ParallelConfig), and so to the run that reads the checkpoint.
_LAYOUT_IN_SAVED_MODEL = ("tensor_model_parallel_size", "sequence_parallel")


def saved_model_fields(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """A checkpoint's ``settings["model"]`` as ModelConfig fields: the layout fields some checkpoints also
    saved there are dropped (a run takes its TP size and SP flag from its own parallel settings)."""
    return {name: value for name, value in saved.items() if name not in _LAYOUT_IN_SAVED_MODEL}
