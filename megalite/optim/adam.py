"""Fused Adam / AdamW: one kernel call per parameter group over all of its tensors.

The update, per element, in fp32 (Kingma & Ba 2015, Alg. 1; decoupled decay: Loshchilov & Hutter
2019, Alg. 2), written exactly as ``torch.optim.AdamW`` / ``torch.optim.Adam`` compute it:

    AdamW (adam_w_mode=True):   p <- p * (1 - lr * wd)          (decay the weight, not the gradient)
    Adam  (adam_w_mode=False):  g <- g + wd * p                 (L2 penalty folded into the gradient)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Three entry points:

* ``adam_step``         fp32 params, grads and moments, updated in place.
* ``adam_step_master``  mixed precision in one pass: read the model's gradient (bf16/fp16/fp32),
                        divide it by ``grad_scale``, update the fp32 master and moments, write the
                        master rounded to nearest-even into the bf16/fp16 model parameter.
* ``FusedAdam``         a ``torch.optim.Optimizer`` over fp32 params whose ``state_dict`` has the
                        same ``step`` / ``exp_avg`` / ``exp_avg_sq`` entries as ``torch.optim.AdamW``.

Each runs the C++ (CPU, OpenMP) or CUDA (multi-tensor apply) kernel, or the PyTorch reference
below when the extension is missing or ``MEGALITE_KERNELS=reference`` (``megalite.ops.backend``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megalite.ops.backend import check_tensor, use_native

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_FP32 = (torch.float32,)


# -- reference (the oracle of tests; runs where no kernel is built) -------------------------------

@torch.no_grad()
def adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
                        adam_w_mode=True) -> None:
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay != 0:
            if adam_w_mode:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


@torch.no_grad()
def adam_step_master_reference(model_params, grads, master_params, exp_avgs, exp_avg_sqs, *, step, lr, beta1,
                               beta2, eps, weight_decay, adam_w_mode=True, grad_scale=1.0,
                               found_inf: torch.Tensor, check_finite: bool = True) -> None:
    if found_inf.item() != 0:  # the reference may synchronize; the kernels decide on the device
        return
    inv_scale = torch.tensor(1.0 / grad_scale, dtype=torch.float32).item()  # the kernels' fp32 multiplier
    grads32 = [g.float() * inv_scale for g in grads]
    if check_finite and not all(torch.isfinite(g).all() for g in grads32):
        found_inf.fill_(1.0)
        return
    adam_step_reference(master_params, grads32, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2,
                        eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode)
    for model_param, master in zip(model_params, master_params):
        model_param.copy_(master)   # round to nearest even, as the kernels


# -- checks shared by both paths ------------------------------------------------------------------

def _check_lengths(names: Sequence[str], lists: Sequence[Sequence[torch.Tensor]]) -> torch.device:
    """Equal list lengths; returns the device of the first tensor (cpu for empty lists)."""
    lengths = {name: len(tensors) for name, tensors in zip(names, lists)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"tensor lists differ in length: {lengths}; pass one entry per parameter in each")
    return lists[0][0].device if lists[0] else torch.device("cpu")


def _check_lists(names: Sequence[str], lists: Sequence[Sequence[torch.Tensor]], dtypes) -> torch.device:
    """Every tensor: on the first one's device, contiguous, of an allowed dtype, of its entry's numel."""
    device = _check_lengths(names, lists)
    if not lists[0]:
        return device
    for name, tensors, allowed in zip(names, lists, dtypes):
        for index, tensor in enumerate(tensors):
            check_tensor(f"{name}[{index}]", tensor, device, allowed)
    for index, column in enumerate(zip(*lists)):
        sizes = {name: t.numel() for name, t in zip(names, column)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"entry {index} has different element counts across lists: {sizes}")
    return device


def _run_native(op, names: Sequence[str], lists: Sequence[Sequence[torch.Tensor]], dtypes) -> None:
    """Run a native operator without the per-tensor Python checks: its C++ side checks the same
    things (csrc/tensor_checks.h) before it writes anything, and the Python walk costs ~1 ms per
    call for GPT-2 small's 148 x 4 tensors -- as long as the CUDA kernel itself.  On its error, the
    Python checks run to raise the ValueError/TypeError that names the tensor and the fix."""
    try:
        op()
    except RuntimeError:
        _check_lists(names, lists, dtypes)
        raise


def _check_step(step: int) -> int:
    if int(step) != step or step < 1:
        raise ValueError(f"step {step} must be a positive integer (the 1-based count of updates, for bias correction)")
    return int(step)


# -- public API ---------------------------------------------------------------------------------

def adam_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
              exp_avg_sqs: List[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float, adam_w_mode: bool = True) -> None:
    """One Adam/AdamW update of every tensor in the lists, in place.

    All tensors: fp32, contiguous, on one device; entry i of each list has the same number of
    elements (shapes may differ, e.g. a flat piece of a parameter). ``step`` is the 1-based count
    of this update (bias correction).
    """
    step = _check_step(step)
    names, lists, dtypes = ("params", "grads", "exp_avgs", "exp_avg_sqs"), (params, grads, exp_avgs, exp_avg_sqs), \
        (_FP32,) * 4
    device = _check_lengths(names, lists)
    if not params:
        return
    hyper = dict(step=step, lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), adam_w_mode=bool(adam_w_mode))
    if not use_native(device):
        _check_lists(names, lists, dtypes)
        adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, **hyper)
        return
    _run_native(lambda: torch.ops.megalite.adam_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                                     *hyper.values()), names, lists, dtypes)


def adam_step_master(model_params: List[torch.Tensor], grads: List[torch.Tensor], master_params: List[torch.Tensor],
                     exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor], *, step: int, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float, adam_w_mode: bool = True,
                     grad_scale: float = 1.0, found_inf: Optional[torch.Tensor] = None,
                     check_finite: bool = True) -> torch.Tensor:
    """Mixed-precision Adam/AdamW in one pass over the data; returns the ``found_inf`` flag.

    model_params: bf16/fp16 (written: the updated master, rounded to nearest even);
    grads: bf16/fp16/fp32, the gradient times ``grad_scale`` (the loss scale; fold a clipping
    factor in as ``grad_scale = loss_scale / clip_coeff``); master_params, exp_avgs, exp_avg_sqs:
    fp32. All contiguous, on one device, entry i of equal numel in each list.

    found_inf: a 1-element fp32 tensor on the same device (created as zero when None). The step is
    all or nothing, decided on the device with no host synchronization:
      * if found_inf is nonzero on entry, nothing is written (a flag raised by an earlier check,
        e.g. the grid-wide gradient norm, skips the step);
      * otherwise every unscaled gradient is checked first; if any is inf/nan, found_inf is set
        to 1 and nothing is written -- masters, moments and model params keep their old values.
    The caller reads found_inf (one sync, when it wants) to back off the loss scale; ``step``
    should then not advance.  The check costs one extra read of the gradients; a caller that has
    already proven them finite (e.g. MegaliteOptimizer, from the grid-wide gradient norm) passes
    ``check_finite=False`` to skip it -- an inf/nan gradient then reaches the weights.
    """
    step = _check_step(step)
    names = ("model_params", "grads", "master_params", "exp_avgs", "exp_avg_sqs")
    lists = (model_params, grads, master_params, exp_avgs, exp_avg_sqs)
    dtypes = (_HALF_DTYPES, _HALF_DTYPES + _FP32, _FP32, _FP32, _FP32)
    device = _check_lengths(names, lists)
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    check_tensor("found_inf", found_inf, device, _FP32)
    if found_inf.numel() != 1:
        raise ValueError(f"found_inf has {found_inf.numel()} elements; pass a 1-element fp32 tensor")
    if grad_scale <= 0 or not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale {grad_scale} must be a positive finite number (the loss scale)")
    if not model_params:
        return found_inf
    hyper = dict(step=step, lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), adam_w_mode=bool(adam_w_mode), grad_scale=float(grad_scale),
                 check_finite=bool(check_finite))
    if not use_native(device):
        _check_lists(names, lists, dtypes)
        adam_step_master_reference(model_params, grads, master_params, exp_avgs, exp_avg_sqs, found_inf=found_inf,
                                   **hyper)
    else:
        _run_native(lambda: torch.ops.megalite.adam_step_master(
            list(model_params), list(grads), list(master_params), list(exp_avgs), list(exp_avg_sqs), found_inf,
            *hyper.values()), names, lists, dtypes)
    return found_inf


def _refuse_amsgrad(amsgrad) -> None:
    if amsgrad:
        raise ValueError("FusedAdam has no AMSGrad (amsgrad=True, e.g. from a torch AdamW state_dict); "
                         "use torch.optim.AdamW(amsgrad=True)")


def _host_step(step) -> torch.Tensor:
    """The per-parameter step count as a CPU fp32 scalar: torch's fused or capturable AdamW keeps it
    on the GPU, where reading it would synchronize the host once per parameter per step."""
    if isinstance(step, torch.Tensor):
        return step.detach().to(device="cpu", dtype=torch.float32)
    return torch.tensor(float(step), dtype=torch.float32)


class FusedAdam(torch.optim.Optimizer):
    """Adam (``adam_w_mode=False``, L2 decay) or AdamW over fp32 parameters, one fused call per group.

    State per parameter, as ``torch.optim.AdamW``: ``step`` (fp32 scalar tensor, kept on the CPU),
    ``exp_avg``, ``exp_avg_sq``; so a state_dict moves between this and torch's AdamW.  Of AdamW's
    options, ``maximize`` is honoured (the update steps along +grad, at the cost of a negated copy of
    each gradient) and ``amsgrad=True`` is refused, in the constructor and in ``load_state_dict``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, adam_w_mode: bool = True, maximize: bool = False, amsgrad: bool = False):
        if lr < 0:
            raise ValueError(f"lr {lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas {betas} must each lie in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps {eps} and weight_decay {weight_decay} must be >= 0")
        _refuse_amsgrad(amsgrad)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      adam_w_mode=adam_w_mode, maximize=bool(maximize), amsgrad=False))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:   # a state_dict saved by torch's AdamW has no adam_w_mode
            group.setdefault("adam_w_mode", self.defaults["adam_w_mode"])
            group.setdefault("maximize", False)
            group.setdefault("amsgrad", False)

    def load_state_dict(self, state_dict) -> None:
        for group in state_dict["param_groups"]:
            _refuse_amsgrad(group.get("amsgrad", False))
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "step" in state:
                state["step"] = _host_step(state["step"])

    def _group_by_step(self, group) -> Dict[int, Tuple[list, list, list, list]]:
        """The group's params with a gradient, by their step count after this update: torch keeps a
        count per parameter, and params that skipped a step (no grad) may lag, so each distinct count
        gets one fused call (normally there is exactly one)."""
        by_step: Dict[int, Tuple[list, list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FusedAdam does not support sparse gradients; use torch.optim.SparseAdam")
            if p.dtype != torch.float32:
                raise TypeError(f"FusedAdam updates fp32 parameters, got {p.dtype} of shape {tuple(p.shape)}; "
                                f"keep fp32 masters and use megalite.optim.adam.adam_step_master")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device.type != "cpu":   # set by hand on the GPU: one sync, then none
                state["step"] = _host_step(state["step"])
            state["step"] += 1
            grad = -p.grad if group["maximize"] else p.grad
            lists = by_step.setdefault(int(state["step"].item()), ([], [], [], []))
            for target, tensor in zip(lists, (p, grad, state["exp_avg"], state["exp_avg_sq"])):
                target.append(tensor)
        return by_step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _refuse_amsgrad(group.get("amsgrad", False))
            beta1, beta2 = group["betas"]
            for step, (params, grads, exp_avgs, exp_avg_sqs) in self._group_by_step(group).items():
                adam_step(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                          eps=group["eps"], weight_decay=group["weight_decay"], adam_w_mode=group["adam_w_mode"])
        return loss
