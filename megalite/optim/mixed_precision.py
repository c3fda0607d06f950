"""Mixed precision: how bf16/fp16 training works in megalite, and the loss scalers fp16 needs.

With ``--bf16`` or ``--fp16`` the model's parameters are half precision, while the optimizer keeps
an fp32 master copy of every parameter (its own tensor, or -- under ZeRO-1 -- of the shard it owns)
and gradients are accumulated in fp32 (``param.main_grad``, see ``parallel/data_parallel.py``).
Each step: unscale the fp32 grads, check them for inf/nan, clip, update the masters with Adam,
copy the masters back into the half-precision parameters (``optimizer.py`` does all of this).

bf16 has fp32's exponent range, so it needs no loss scaling.  fp16 overflows above 65504 and loses
small gradients below 6e-8 (its subnormal floor), so the loss is multiplied by a scale S before
backward and the gradients by 1/S after.  The dynamic scaler (Micikevicius et al. 2018, "Mixed
Precision Training", Sec. 3.2) searches for the largest S that does not overflow:

    start at --initial-loss-scale (2^32)
    overflow (any inf/nan gradient on ANY rank of the model replica): skip the step; after
        --hysteresis overflows since the last growth, halve S (never below --min-loss-scale)
    --loss-scale-window consecutive clean steps: double S (and re-arm the hysteresis)

The overflow flag is reduced over every rank that holds part of the replica's gradient (the
model-parallel group; under ZeRO-1 also the data-parallel group), so all ranks skip the same step
and their scalers stay equal -- a rank that stepped while its peers skipped would silently fork the
model.
"""
from __future__ import annotations

from typing import Optional


class ConstantLossScaler:
    """``--loss-scale S``: a fixed scale; overflowing steps are still skipped, S never changes."""

    def __init__(self, scale: float):
        if scale <= 0:
            raise ValueError(f"loss scale {scale} must be positive")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Megatron-LM's dynamic scaler with hysteresis (semantics in the module docstring)."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        if initial_scale <= 0 or min_scale <= 0:
            raise ValueError(f"initial scale {initial_scale} and minimum scale {min_scale} must be positive")
        if min_scale > initial_scale:
            raise ValueError(f"minimum scale {min_scale} is above the initial scale {initial_scale}")
        if growth_interval < 1:
            raise ValueError(f"growth interval {growth_interval} must be at least 1")
        if hysteresis < 1:
            raise ValueError(f"hysteresis {hysteresis} must be at least 1")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.clean_steps = 0                  # consecutive steps without overflow
        self.overflows_left = hysteresis      # overflows tolerated before the next backoff

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                # Stays <= 0 until the next growth, so further overflows keep halving (as Megatron does).
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.clean_steps = 0
                self.overflows_left = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows_left = int(state["overflows_left"])


def build_loss_scaler(opt_config) -> Optional[object]:
    """The scaler for ``--fp16`` (constant with ``--loss-scale``, else dynamic); None for fp32 and bf16."""
    if not opt_config.fp16:
        return None
    if opt_config.loss_scale is not None:
        return ConstantLossScaler(opt_config.loss_scale)
    return DynamicLossScaler(initial_scale=opt_config.initial_loss_scale, min_scale=opt_config.min_loss_scale,
                             growth_interval=opt_config.loss_scale_window, hysteresis=opt_config.hysteresis)
