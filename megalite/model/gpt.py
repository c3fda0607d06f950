"""GPT and LLaMA-style language models, one pipeline chunk at a time.

    GPT:    learned positions, LayerNorm, GELU MLP, output layer tied to the word embedding
    LLaMA:  rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, untied output layer
            (``--position-embedding-type rope --normalization RMSNorm --swiglu
            --num-query-groups G --untie-embeddings-and-output-weights``)

A :class:`GPTModel` holds the layers ``layer_numbers`` (global indices) of the full model, plus the
embedding if it is the first pipeline chunk (``pre_process``) and the final norm, output layer and
loss if it is the last (``post_process``).  Every parameter is drawn from (seed, its name in the full
model), so the model is the same under any TP / PP / virtual-PP split.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from megalite.config.settings import ModelConfig
from megalite.model.moe.layer import mlp_builder
from megalite.model.rotary import model_rotary_tables
from megalite.model.transformer import Dropout, TransformerBlock, build_norm
from megalite.parallel.context_parallel import context_parallel_positions
from megalite.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    initialize_from_seed,
    vocab_parallel_cross_entropy,
)
from megalite.parallel.mappings import scatter_to_sp, tp_size
from megalite.parallel.param_info import Init, ParamInfo, mark_shared_embedding, set_param_info

WORD_EMBEDDING = "embedding.word_embeddings.weight"


class Embedding(nn.Module):
    """tokens [b, s] (and position_ids [b, s]) -> hidden [s(/t if SP), b, h]: word (+ position) embeddings, dropout."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        # Padding rows (ids >= vocab_size) stay zero: the real rows do not depend on the TP padding.
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size(tp_size()), config.hidden_size,
            init=Init("normal", config.init_method_std, real_rows=config.vocab_size))
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            set_param_info(self.position_embeddings.weight, ParamInfo(init=Init("normal", config.init_method_std)))
        self.sequence_parallel = sequence_parallel
        self.dropout = Dropout(config.hidden_dropout, sequence_parallel)

    def forward(self, tokens, position_ids):
        x = self.word_embeddings(tokens.t())                               # [s, b, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids.t())
        if self.sequence_parallel:
            # The sum is replicated; each rank keeps its tokens (backward all-gathers the full grad,
            # so the position table's grad is complete on every rank).
            x = scatter_to_sp(x)                                           # [s/t, b, h]
        return self.dropout(x)


class GPTModel(nn.Module):
    """One pipeline chunk of a GPT / LLaMA-style model (see the module docstring).

    forward(tokens [b, s] int64, position_ids [b, s] or None, labels [b, s] or None) returns
    (under context parallelism s is this rank's s/cp tokens, split_for_context_parallel's order, and
    position_ids default to their true positions)
      post_process with labels   -> per-token loss [b, s] float32
      post_process, no labels    -> logits [s, b, padded_vocab/t] (columns >= vocab_size are padding)
      not post_process           -> hidden states [s(/t if SP), b, h]
    When not pre_process, ``tokens`` are ignored and the tensor given to :meth:`set_input_tensor` is used.

    The TP size is the process grid's (1 without a grid); ``sequence_parallel`` is ParallelConfig's
    switch that splits the residual stream's tokens (norms, dropout) over the TP ranks.
    """

    def __init__(self, config: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                 layer_numbers: Optional[Sequence[int]] = None, sequence_parallel: bool = False):
        super().__init__()
        tp = tp_size()
        config.check_tensor_parallel(tp, sequence_parallel)
        self.config, self.sequence_parallel = config, sequence_parallel
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = list(range(config.num_layers)) if layer_numbers is None else list(layer_numbers)
        self.tied = not config.untie_embeddings_and_output_weights
        self.rope = config.position_embedding_type == "rope"
        self.input_tensor = None

        if pre_process:
            self.embedding = Embedding(config, sequence_parallel)
        self.decoder = TransformerBlock(config, len(self.layer_numbers), sequence_parallel, self.layer_numbers,
                                        mlp_builder(config) if config.num_experts is not None else None)
        if post_process:
            self.final_norm = build_norm(config, sequence_parallel)
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size(tp), bias=False, sequence_parallel=sequence_parallel,
                init=Init("normal", config.init_method_std, real_rows=config.vocab_size))
            if self.tied and pre_process:
                self.output_layer.weight = self.embedding.word_embeddings.weight  # one parameter
        if self.tied:
            # The first and last stage each hold the word embedding; grads are summed over the
            # embedding group by finalize_model_grads (no-op when both are this chunk).
            for param in self._word_embedding_copies():
                mark_shared_embedding(param)
        initialize_from_seed(self._full_named_parameters(), config.seed)

    def _word_embedding_copies(self):
        copies = []
        if self.pre_process:
            copies.append(self.embedding.word_embeddings.weight)
        if self.post_process and not (self.tied and self.pre_process):
            copies.append(self.output_layer.weight)
        return copies

    def _full_named_parameters(self):
        """(name in the full model with global layer numbers, param); the tied output layer's
        weight is named after the word embedding it copies, so both draw the same values."""
        for name, param in self.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(self.layer_numbers[int(parts[2])])
            name = ".".join(parts)
            if self.tied and name == "output_layer.weight":
                name = WORD_EMBEDDING
            yield name, param

    def set_input_tensor(self, tensor) -> None:
        """Pipeline: hidden states [s(/t if SP), b, h] from the previous stage (a 1-list is accepted)."""
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self.input_tensor = tensor

    def forward(self, tokens, position_ids=None, labels=None, documents=None):
        if self.pre_process:
            batch, seq = tokens.shape
        else:
            if self.input_tensor is None:
                raise RuntimeError("this pipeline chunk has no embedding (pre_process=False): hand it the previous "
                                   "stage's hidden states with set_input_tensor() before forward")
            seq = self.input_tensor.shape[0] * (tp_size() if self.sequence_parallel else 1)
            batch = self.input_tensor.shape[1]
        if position_ids is None:
            device = tokens.device if tokens is not None else self.input_tensor.device
            position_ids = context_parallel_positions(seq, device).expand(batch, seq)  # arange without CP

        x = self.embedding(tokens, position_ids) if self.pre_process else self.input_tensor
        rotary = model_rotary_tables(position_ids, self.config) if self.rope else None
        x = self.decoder(x, rotary, documents)                             # [s(/t), b, h]
        if not self.post_process:
            return x
        logits = self.output_layer(self.final_norm(x))                     # [s, b, V/t]
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.config.vocab_size)  # [s, b] float32
        return loss.t().contiguous()                                       # [b, s]
