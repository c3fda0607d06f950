"""The optimizer the training loop steps: AdamW with fp32 masters, grid-wide clipping and loss scaling.

One step, after ``finalize_model_grads`` has reduced the gradients::

    grads  = param.main_grad (fp32, DDP) or param.grad           [the pieces this rank updates]
    grads *= 1 / loss_scale                                      (fp16 only)
    norm, found_inf = global_grad_norm(grads)                     one all-reduce per group (clip_grads.py)
    if found_inf: skip the step, back off the loss scale          (every rank agrees: the flag is reduced)
    grads *= min(1, clip_grad / norm)
    adam_step(masters, grads, exp_avgs, exp_avg_sqs)             megalite/optim/adam.py (fused kernels)
    params <- masters                                             (half-precision models only)

For half-precision parameters the last two lines are one pass (``adam_step_master``: update the
fp32 master and moments, write the master rounded to bf16/fp16 into the parameter).

The unit of update is a *piece*: a contiguous flat range of one parameter.  Which pieces this
rank updates is the optimizer's *sharding*: :class:`ReplicatedParams` (every rank updates whole
parameters) or ZeRO-1's ``ZeroOneShards`` (``distributed.py``: the parts of each parameter that
fall in this rank's shard of the grad buffer, plus an all-gather after the update) -- the rest of
the step is shared.

Weight decay applies to matrices only: 1-D parameters (biases, norm weights) get none, as in
Megatron-LM and GPT-2/3 training practice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple

import torch

from megalite.config.settings import OptimizerConfig
from megalite.optim.adam import adam_step, adam_step_master  # fused kernels (csrc) behind these calls
from megalite.optim.clip_grads import clip_grads_by_norm_, global_grad_norm, param_is_counted_in_norm
from megalite.optim.mixed_precision import build_loss_scaler
from megalite.parallel.param_info import local_shape
from megalite.parallel.state import ProcessGrid


@dataclass
class Piece:
    """A contiguous range [start, end) of one flattened parameter that this rank updates."""

    param: torch.nn.Parameter
    start: int
    end: int
    model_view: torch.Tensor    # param.view(-1)[start:end] (same storage as the model's parameter)
    master: torch.Tensor        # fp32; IS model_view when the parameter is fp32 (no copy)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    counted_in_norm: bool
    grad_view: Optional[torch.Tensor] = None   # sharded strategies: this range of this rank's fp32 grad shard

    @property
    def has_own_master(self) -> bool:
        return self.master is not self.model_view

    def grad(self) -> torch.Tensor:
        """fp32 gradient of the piece: a view of the grad shard (sharded DDP), of ``main_grad`` (DDP) or
        of/from ``.grad`` (plain module)."""
        if self.grad_view is not None:
            return self.grad_view
        main_grad = getattr(self.param, "main_grad", None)
        if main_grad is not None:
            return main_grad.view(-1)[self.start:self.end]
        if self.param.grad is None:  # unused this step: a zero grad, as DDP's zeroed buffer gives
            return torch.zeros_like(self.master)
        return self.param.grad.view(-1)[self.start:self.end].float()


def make_piece(param: torch.nn.Parameter, start: int, end: int, grid: Optional[ProcessGrid],
               sharded: bool = False, model_view: Optional[torch.Tensor] = None,
               grad_view: Optional[torch.Tensor] = None) -> Piece:
    """``model_view`` / ``grad_view``: where the range lives when not in the parameter itself (the shards
    of a sharded strategy, parallel/grad_buffer.py)."""
    if model_view is None:
        model_view = param.detach().view(-1)[start:end]
    master = model_view if param.dtype == torch.float32 else model_view.float()  # .float() copies
    return Piece(param, start, end, model_view, master, torch.zeros_like(master), torch.zeros_like(master),
                 param_is_counted_in_norm(param, grid, sharded), grad_view)


def unique_parameters(model_chunks: Sequence[torch.nn.Module]) -> List[torch.nn.Parameter]:
    seen, params = set(), []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def uses_weight_decay(param: torch.nn.Parameter) -> bool:
    return len(local_shape(param)) > 1   # (a ZeRO-3 parameter is empty between uses)


# The parameters --decoupled-lr drives, as Megatron-LM marks them: the word embedding (first stage) and the
# output layer (last stage; the same tensor when tied on one stage), named as GPTModel names them.
EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")


def embedding_or_output_ids(model_chunks: Sequence[torch.nn.Module]) -> set:
    """ids of the chunks' embedding and output-layer weights (any wrapper's name prefix allowed)."""
    return {id(param) for chunk in model_chunks for name, param in chunk.named_parameters()
            if any(name == end or name.endswith("." + end) for end in EMBEDDING_OR_OUTPUT)}


class ParamSharding(Protocol):
    """Which parts of the parameters this rank updates, and what the step adds for that."""

    def pieces(self, params: Sequence[torch.nn.Parameter], grid: Optional[ProcessGrid]) -> List[Piece]:
        """This rank's pieces of ``params``, in the order of ``params``."""

    def norm_groups(self, grid: Optional[ProcessGrid]) -> list:
        """Groups whose ranks hold disjoint parts of one model replica's gradient."""

    def after_update(self) -> None:
        """Make every rank's model whole again after the update."""


class ReplicatedParams:
    """No optimizer sharding: every rank updates whole parameters (its TP/PP shard of the model)."""

    def pieces(self, params: Sequence[torch.nn.Parameter], grid: Optional[ProcessGrid]) -> List[Piece]:
        return [make_piece(p, 0, p.numel(), grid) for p in params]

    def norm_groups(self, grid: Optional[ProcessGrid]) -> list:
        # Where the experts have groups of their own, ranks of one replica hold different experts: the sum runs
        # over the whole grid and clip_grads.py counts every other parameter on DP x CP rank 0 only.
        if grid is None:
            return []
        return [grid.mp_group] + ([grid.dp_cp_group] if getattr(grid, "edp_group", None) is not None else [])

    def after_update(self) -> None:
        pass


def parameter_groups(params: Sequence[torch.nn.Parameter], config: OptimizerConfig, decoupled_ids: set) -> list:
    """Decayed matrices, then undecayed 1-D params; with --decoupled-lr the embedding and output layer form
    groups of their own after those, marked ``decoupled_lr`` (the LR scheduler gives them their own rates)."""
    groups = []
    for decoupled in (False, True):
        if decoupled and config.decoupled_lr is None:
            break
        for decayed in (True, False):
            members = [p for p in params if uses_weight_decay(p) == decayed
                       and (config.decoupled_lr is not None and id(p) in decoupled_ids) == decoupled]
            group = {"params": members, "lr": config.decoupled_lr if decoupled else config.lr,
                     "weight_decay": config.weight_decay if decayed else 0.0}
            if decoupled:
                group["decoupled_lr"] = True
            if members:
                groups.append(group)
    return groups


class MegaliteOptimizer:
    """AdamW over fp32 masters; ``step() -> (stepped, grad_norm)``; see the module docstring.

    ``param_groups``: ``[{"params", "lr", "weight_decay"}, ...]`` (decayed matrices, then undecayed
    1-D params); the LR scheduler writes ``lr``.  ``sharding`` decides what this rank updates
    (default :class:`ReplicatedParams`).
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module], config: OptimizerConfig,
                 grid: Optional[ProcessGrid], sharding: Optional[ParamSharding] = None):
        self.model_chunks = list(model_chunks)
        self.config, self.grid = config, grid
        self.sharding = sharding if sharding is not None else ReplicatedParams()
        self.loss_scaler = build_loss_scaler(config)
        self.num_steps = 0          # steps applied (Adam's bias-correction step count)
        self.num_skipped_steps = 0  # fp16 overflows
        params = unique_parameters(self.model_chunks)
        if not params:
            raise ValueError("the model has no trainable parameters; nothing to optimize")
        self.param_groups = parameter_groups(params, config, embedding_or_output_ids(self.model_chunks))
        self.pieces: List[List[Piece]] = [self.sharding.pieces(group["params"], grid) for group in self.param_groups]

    def all_pieces(self) -> List[Piece]:
        return [piece for group in self.pieces for piece in group]

    # -- loss scaling ------------------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: ``loss * loss_scale`` under fp16, ``loss`` otherwise."""
        return loss if self.loss_scaler is None else loss * self.loss_scaler.scale

    # -- the step ----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the DDP grad buffers (``main_grad``) and drop any ``.grad``."""
        for chunk in self.model_chunks:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    @torch.no_grad()
    def step(self) -> Tuple[bool, Optional[float]]:
        """Clip, maybe skip (fp16 overflow), update.  Returns (stepped, grad_norm); grad_norm is None if skipped."""
        pieces = self.all_pieces()
        grads = [piece.grad() for piece in pieces]
        if self.loss_scaler is not None and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scaler.scale)
        grad_norm, found_inf = global_grad_norm(grads, [p.counted_in_norm for p in pieces],
                                                self.sharding.norm_groups(self.grid))
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf)
        if found_inf:
            if self.loss_scaler is None:
                raise FloatingPointError(f"gradient norm is {grad_norm} (inf/nan) in a {self._precision()} run; "
                                         f"lower --lr or check the data")
            self.num_skipped_steps += 1
            return False, None
        if self.config.clip_grad > 0:
            clip_grads_by_norm_(grads, self.config.clip_grad, grad_norm)

        self.num_steps += 1
        start = 0
        for group, group_pieces in zip(self.param_groups, self.pieces):
            group_grads = grads[start:start + len(group_pieces)]
            start += len(group_pieces)
            if not group_pieces:
                continue
            self._update_group(group, group_pieces, group_grads)
        self.sharding.after_update()
        return True, grad_norm

    def _update_group(self, group: dict, pieces: List[Piece], grads: List[torch.Tensor]) -> None:
        """Adam on one group: fp32 params in place; half-precision params through their fp32 masters,
        with the rounded master written back in the same pass (one call per model dtype)."""
        hyper = dict(step=self.num_steps, lr=group["lr"], beta1=self.config.adam_beta1,
                     beta2=self.config.adam_beta2, eps=self.config.adam_eps, weight_decay=group["weight_decay"],
                     adam_w_mode=True)
        by_dtype = {}
        for piece, grad in zip(pieces, grads):
            key = piece.model_view.dtype if piece.has_own_master else torch.float32
            by_dtype.setdefault(key, []).append((piece, grad))
        for dtype, pairs in by_dtype.items():
            masters = [p.master for p, _ in pairs]
            moments = ([p.exp_avg for p, _ in pairs], [p.exp_avg_sq for p, _ in pairs])
            if dtype == torch.float32:
                adam_step(masters, [g for _, g in pairs], *moments, **hyper)
            else:
                # The grads are unscaled and proven finite by the grid-wide norm in step(), so the
                # kernel's own inf/nan pre-check would only re-read them.
                adam_step_master([p.model_view for p, _ in pairs], [g for _, g in pairs], masters, *moments,
                                 **hyper, check_finite=False)

    def _precision(self) -> str:
        return "bf16" if self.config.bf16 else "fp16" if self.config.fp16 else "fp32"

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model's (e.g. just loaded) parameters into the fp32 masters."""
        for piece in self.all_pieces():
            if piece.has_own_master:
                piece.master.copy_(piece.model_view)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: Adam moments and fp32 masters of its pieces, in piece order, plus scalars."""
        return {
            "step": self.num_steps,
            "skipped_steps": self.num_skipped_steps,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "pieces": [{"exp_avg": p.exp_avg, "exp_avg_sq": p.exp_avg_sq,
                        **({"master": p.master} if p.has_own_master else {})} for p in self.all_pieces()],
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        pieces = self.all_pieces()
        saved_decoupled = any(g.get("decoupled_lr") for g in state["param_groups"])
        if saved_decoupled != any(g.get("decoupled_lr") for g in self.param_groups):
            raise ValueError(f"optimizer state was saved {'with' if saved_decoupled else 'without'} --decoupled-lr "
                             f"and this run is {'without' if saved_decoupled else 'with'} it: its parameter groups "
                             f"differ; train as the checkpoint was (or --no-load-optim)")
        if len(state["pieces"]) != len(pieces) or len(state["param_groups"]) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(state['pieces'])} parameter pieces in "
                             f"{len(state['param_groups'])} groups, this optimizer {len(pieces)} in "
                             f"{len(self.param_groups)}; it was saved for another model or parallel layout")
        for i, (piece, saved) in enumerate(zip(pieces, state["pieces"])):
            if saved["exp_avg"].shape != piece.exp_avg.shape:
                raise ValueError(f"optimizer state piece {i} has shape {tuple(saved['exp_avg'].shape)}, expected "
                                 f"{tuple(piece.exp_avg.shape)}; it was saved for another parallel layout")
            piece.exp_avg.copy_(saved["exp_avg"])
            piece.exp_avg_sq.copy_(saved["exp_avg_sq"])
            if piece.has_own_master:
                if "master" in saved:
                    piece.master.copy_(saved["master"])
                else:  # saved by an fp32 run: the model's loaded parameters are the masters
                    piece.master.copy_(piece.model_view)
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self.num_steps = int(state["step"])
        self.num_skipped_steps = int(state.get("skipped_steps", 0))
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])

    # -- memory --------------------------------------------------------------------------------------
    def memory_bytes(self) -> dict:
        """Bytes this rank holds for training state: model params, grads, fp32 masters, Adam moments.

        Counts the DDP buffers (padded) where the model is DDP-wrapped: what they keep between steps (the
        shards, under the sharded strategies that drop whole gradients or parameters).  ``num_params`` is the
        parameters of this rank's chunks (whole, whatever is sharded).
        """
        params = unique_parameters(self.model_chunks)
        buffers = [b for chunk in self.model_chunks for b in getattr(chunk, "buffers_by_dtype", {}).values()]
        if buffers:
            param_bytes, grad_bytes = (sum(part) for part in zip(*(b.resident_bytes() for b in buffers)))
        else:
            grad_bytes = sum(p.numel() * p.element_size() for p in params)  # .grad has the param's dtype
            param_bytes = grad_bytes
        pieces = self.all_pieces()
        return {"params": param_bytes, "grads": grad_bytes,
                "master": sum(p.master.numel() * 4 for p in pieces if p.has_own_master),
                "adam": sum((p.exp_avg.numel() + p.exp_avg_sq.numel()) * 4 for p in pieces),
                "num_params": sum(end - start for b in buffers for start, end in b.param_range.values()) if buffers
                else sum(p.numel() for p in params)}

    def bytes_per_param(self) -> float:
        """(params + grads + masters + Adam moments) bytes on this rank / parameters on this rank."""
        mem = self.memory_bytes()
        return (mem["params"] + mem["grads"] + mem["master"] + mem["adam"]) / mem["num_params"]

