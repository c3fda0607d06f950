"""Mixture-of-experts settings: :class:`MoEFields`, the MoE flags (Megatron-LM's names and meanings), which
:class:`~megalite.config.model_settings.ModelConfig` inherits, and the rules among them.

The model they describe (megalite/model/moe/): in every ``--moe-layer-freq``-th layer (or the layers its list
marks 1, config/layer_pattern.py) the MLP becomes
``--num-experts`` expert MLPs of width ``--moe-ffn-hidden-size`` (default ``--ffn-hidden-size``); a linear router
scores the experts for each token and sends it to its ``--moe-router-topk`` best, whose outputs are summed,
weighted by the router's probabilities; an optional shared expert (``--moe-shared-expert-intermediate-size``)
reads every token (scaled by a learned sigmoid gate with ``--moe-shared-expert-gate``).  Balancing: an
auxiliary loss (whole micro-batch or per sequence), a z-loss on the router's logits, or a per-expert bias on
the selection scores updated after each step (no loss at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from megalite.config.flags import flag
from megalite.config.layer_pattern import moe_freq_type

__all__ = ["MoEFields", "check_expert_layout"]


@dataclass
class MoEFields:
    """The MoE flags; all inactive while ``num_experts`` is None (a dense model)."""

    num_experts: Optional[int] = flag(None, "experts per MoE layer; default none (a dense model)", at_least=1)
    moe_ffn_hidden_size: Optional[int] = flag(None, "width of each expert's MLP; default --ffn-hidden-size",
                                              at_least=1)
    moe_layer_freq: Union[int, List[int]] = flag(
        1, "every this many layers is an MoE layer (layer i when i %% freq == 0), or a list of 0/1 per layer "
           "such as '([1]*3+[0]*1)*3' (1: experts)", at_least=1, parse=moe_freq_type)
    moe_shared_expert_intermediate_size: Optional[int] = flag(
        None, "width of the shared expert that reads every token beside the routed ones; default none", at_least=1)
    moe_shared_expert_gate: bool = flag(False, "scale the shared expert's output by sigmoid(x g), g a learned "
                                               "[1, hidden] weight (Qwen2-MoE)")
    moe_router_topk: int = flag(2, "experts each token is sent to", at_least=1)
    moe_router_score_function: Literal["softmax", "sigmoid"] = flag("softmax", "how the router's logits become "
                                                                               "expert scores")
    moe_router_pre_softmax: bool = flag(False, "softmax over all experts before choosing the top k (default: "
                                               "choose on the logits, softmax over the chosen k)")
    moe_router_topk_scaling_factor: Optional[float] = flag(None, "multiply the chosen experts' weights by this",
                                                           above=0)
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = flag(
        "aux_loss", "the auxiliary balancing loss: over the micro-batch's tokens, per sequence, or none")
    moe_aux_loss_coeff: float = flag(0.0, "weight of the balancing loss in the training loss", at_least=0)
    moe_z_loss_coeff: Optional[float] = flag(None, "weight of the router z-loss (mean squared log-sum-exp of "
                                                   "the logits); default none", at_least=0)
    moe_router_enable_expert_bias: bool = flag(False, "aux-loss-free balancing: a per-expert bias added to the "
                                                      "scores that choose experts, moved after each step towards "
                                                      "the mean load (sigmoid scores)")
    moe_router_bias_update_rate: float = flag(1e-3, "how far the expert bias moves per step", at_least=0)
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = flag(None, "the router's logits and scores in this "
                                                                     "precision; default the model's")
    moe_grouped_gemm: bool = flag(False, "compute the experts with one grouped GEMM (torch._grouped_mm on CUDA "
                                         "sm90 bf16 and on the CPU where torch has it, else the same math per "
                                         "expert)")
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = flag(
        "allgather", "how tokens reach the experts of other expert-parallel ranks")
    moe_expert_capacity_factor: Optional[float] = flag(None, "tokens an expert takes, as a multiple of an even "
                                                             "share; default dropless", above=0)
    moe_token_drop_policy: Literal["probs", "position"] = flag("probs", "with a capacity: drop the tokens of "
                                                                        "lowest weight, or the last ones")
    moe_pad_expert_input_to_capacity: bool = flag(False, "with a capacity: pad each expert's input to it (the "
                                                          "balancing loss then counts the padded rows)")

    def _check_moe(self) -> None:
        """The rules among the MoE flags (called by ModelConfig.__post_init__ after its own defaults)."""
        given = [name for name, on in (
            ("--moe-ffn-hidden-size", self.moe_ffn_hidden_size is not None),
            ("--moe-shared-expert-intermediate-size", self.moe_shared_expert_intermediate_size is not None),
            ("--moe-shared-expert-gate", self.moe_shared_expert_gate),
            ("--moe-router-enable-expert-bias", self.moe_router_enable_expert_bias),
            ("--moe-grouped-gemm", self.moe_grouped_gemm),
            ("--moe-expert-capacity-factor", self.moe_expert_capacity_factor is not None)) if on]
        if isinstance(self.moe_layer_freq, list) and len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(f"--moe-layer-freq gives {len(self.moe_layer_freq)} layers but --num-layers is "
                             f"{self.num_layers}; give one 0/1 entry per layer")
        if self.num_experts is None:
            if given:
                raise ValueError(f"{given[0]} describes experts but --num-experts is not given; add --num-experts")
            return
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.moe_router_topk > self.num_experts:
            raise ValueError(f"--moe-router-topk {self.moe_router_topk} exceeds --num-experts {self.num_experts}; "
                             f"choose at most {self.num_experts}")
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ValueError("--moe-router-pre-softmax applies to --moe-router-score-function softmax only; drop one")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (as in "
                             "Megatron-LM); add it")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("--moe-shared-expert-gate gates the shared expert, which is not given; add "
                             "--moe-shared-expert-intermediate-size")
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor (as in "
                             "Megatron-LM); add it")

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global layer ``layer_number`` (from 0) holds experts."""
        if self.num_experts is None:
            return False
        if isinstance(self.moe_layer_freq, list):
            return self.moe_layer_freq[layer_number] == 1
        return layer_number % self.moe_layer_freq == 0


def check_expert_layout(model: MoEFields, parallel, training) -> None:
    """The MoE rules that span configs (training/arguments.py's validate_together calls this)."""
    ep = parallel.expert_model_parallel_size
    if model.num_experts is None:
        if ep > 1:
            raise ValueError(f"--expert-model-parallel-size {ep} needs experts; add --num-experts or drop it")
        return
    if model.num_experts % ep:
        raise ValueError(f"--num-experts {model.num_experts} is not divisible by --expert-model-parallel-size "
                         f"{ep}; each expert-parallel rank holds an equal share of the experts")
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    if tp > 1 and not parallel.sequence_parallel:
        raise ValueError(f"--tensor-model-parallel-size {tp} with --num-experts needs --sequence-parallel (as "
                         f"Megatron-LM requires); add it")
    etp = parallel.expert_tensor_parallel_size or 1
    stage = tp * cp * parallel.data_parallel_size
    if (ep > 1 or etp > 1) and stage % (ep * etp):
        sizes = f"--expert-model-parallel-size {ep}" + (f" x --expert-tensor-parallel-size {etp}" if etp > 1 else "")
        raise ValueError(f"{sizes} does not divide TP x CP x DP = {tp} x {cp} x {parallel.data_parallel_size} = "
                         f"{stage}; experts fold into those ranks")
    if etp > 1:
        _check_expert_tensor_parallel(model, etp, tp)
    if tp > 1 and ep > 1 and etp == 1 and (training.save or training.load) and tp % ep and ep % tp:
        raise ValueError(f"--save / --load with --expert-model-parallel-size {ep} at --tensor-model-parallel-size "
                         f"{tp}: checkpoints need one to divide the other (checkpoint/expert_files.py); choose "
                         f"such an EP")
    if training.calculate_per_token_loss and (model.moe_aux_loss_coeff or model.moe_z_loss_coeff):
        raise ValueError("--calculate-per-token-loss with MoE auxiliary losses is not built yet; drop one")


def _check_expert_tensor_parallel(model: MoEFields, etp: int, tp: int) -> None:
    """The rules of --expert-tensor-parallel-size above 1 (each expert's ffn split over ETP ranks)."""
    if etp != tp:
        raise ValueError(f"--expert-tensor-parallel-size {etp} differs from --tensor-model-parallel-size {tp}; "
                         f"only 1 (each expert whole) or {tp} (the TP group) are built: choose one of them")
    if model.moe_ffn_hidden_size % etp:
        raise ValueError(f"--moe-ffn-hidden-size {model.moe_ffn_hidden_size} is not divisible by "
                         f"--expert-tensor-parallel-size {etp}; choose a multiple of {etp}")
