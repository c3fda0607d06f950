"""Learning-rate schedule: linear warm-up, then linear, cosine or constant decay to ``--min-lr``.

``lr_at(n)`` is the rate used by the n-th optimizer step (n = 1, 2, ...); k = n - 1 steps are done
before it.  Decay follows Megatron-LM's OptimizerParamScheduler in k; warm-up uses n instead of
Megatron's k so that the first step does not run at lr 0::

    n <= warmup:                 lr = max_lr * n / warmup
    warmup <= k <= decay_iters:  r = (k - warmup) / (decay_iters - warmup)
                                 linear:   lr = min_lr + (max_lr - min_lr) * (1 - r)
                                 cosine:   lr = min_lr + (max_lr - min_lr) * (1 + cos(pi r)) / 2
                                 constant: lr = max_lr
    k > decay_iters:             lr = min_lr (constant: max_lr)

So the step right after warm-up runs at max_lr, and min_lr is reached after decay_iters steps.
With ``--decoupled-lr`` the optimizer's groups marked ``decoupled_lr`` (the embedding and output layer)
follow the same curve between their own peak and end rates (``decoupled=(max, min)``), as Megatron-LM's
scheduler does for its decoupled groups.
A schedule counted in samples (``--train-samples``) reads every "step" above as a sample:
``step(increment=samples of the step)``, and n is the samples consumed before the step plus one.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, get_args

from megalite.config.settings import DecayStyle


class LRScheduler:
    """Sets ``optimizer.param_groups[*]["lr"]`` for the coming step; ``step()`` after each optimizer step."""

    STYLES = get_args(DecayStyle)

    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 decay_style: str = "linear", decoupled: Optional[Tuple[float, float]] = None):
        if decay_style not in self.STYLES:
            raise ValueError(f"decay style {decay_style!r}: choose one of {', '.join(self.STYLES)}")
        if warmup_iters > decay_iters:
            raise ValueError(f"a warm-up of {warmup_iters} steps exceeds the decay's {decay_iters} steps")
        if min_lr > max_lr:
            raise ValueError(f"the minimum learning rate {min_lr} is above the peak {max_lr}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_iters, self.decay_iters, self.decay_style = int(warmup_iters), int(decay_iters), decay_style
        self.decoupled = None if decoupled is None else (float(decoupled[0]), float(decoupled[1]))
        self.num_steps = 0  # optimizer steps taken so far
        self._apply()

    def lr_at(self, n: int, peak_and_end: Optional[Tuple[float, float]] = None) -> float:
        """Learning rate of the n-th (1-based) optimizer step; ``peak_and_end``: other (max, min) rates."""
        max_lr, min_lr = peak_and_end or (self.max_lr, self.min_lr)
        if self.warmup_iters > 0 and n <= self.warmup_iters:
            return max_lr * n / self.warmup_iters
        if self.decay_style == "constant":
            return max_lr
        done = n - 1
        if done >= self.decay_iters:
            return min_lr
        ratio = (done - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return min_lr + (max_lr - min_lr) * coeff

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use."""
        return self.lr_at(self.num_steps + 1)

    def _apply(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                decoupled = group.get("decoupled_lr") and self.decoupled
                group["lr"] = self.lr_at(self.num_steps + 1, self.decoupled if decoupled else None)

    def step(self, increment: int = 1) -> None:
        """After an optimizer step: ``increment`` is 1, or the step's samples for a sample-based schedule."""
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "decay_iters": self.decay_iters, "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the command line (a resumed run may change it on purpose);
        # only the position is restored.
        self.num_steps = int(state["num_steps"])
        self._apply()
