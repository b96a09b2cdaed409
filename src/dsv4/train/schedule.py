"""Learning-rate and MTP-weight schedules of DeepSeek-V4 pre-training (spec 6.2, 5).

Warmup-stable-decay: linear warmup to ``peak_lr`` over ``warmup_steps``, constant, then a cosine decay over the last
``decay_steps`` steps down to ``final_ratio * peak_lr`` (Flash: 2.7e-4 -> 2.7e-5, ratio 0.1; Pro 2.0e-4 -> 2.0e-5),
held there after ``total_steps``. The MTP loss weight is 0.3 until the decay starts and 0.1 from then on.

Everything here is a pure function of the step (0-indexed: the value used for the optimizer step number ``step``),
so resuming at any step needs no schedule state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-stable-decay. ``lr(step)``:

    - warmup, ``step < warmup_steps``: ``peak_lr * (step + 1) / warmup_steps`` (the first step is not wasted at 0;
      the last warmup step reaches the peak);
    - stable, up to ``decay_start = total_steps - decay_steps``: ``peak_lr``;
    - decay, ``decay_start <= step <= total_steps``: ``final + (peak - final) (1 + cos(pi p)) / 2`` with
      ``p = (step - decay_start) / decay_steps``, so ``lr(decay_start) = peak`` and ``lr(total_steps) = final``;
    - after ``total_steps``: ``final``.
    """

    peak_lr: float = 2.7e-4
    warmup_steps: int = 2000
    total_steps: int = 100_000
    decay_steps: int = 10_000
    final_ratio: float = 0.1

    def __post_init__(self):
        if not self.peak_lr > 0:
            raise ValueError(f"WSDSchedule.peak_lr must be > 0, got {self.peak_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"WSDSchedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps < 0:
            raise ValueError(f"WSDSchedule.decay_steps must be >= 0, got {self.decay_steps}")
        if self.total_steps < self.warmup_steps + self.decay_steps:
            raise ValueError(f"WSDSchedule.total_steps ({self.total_steps}) must be >= warmup_steps + decay_steps "
                             f"({self.warmup_steps} + {self.decay_steps})")
        if not 0.0 <= self.final_ratio <= 1.0:
            raise ValueError(f"WSDSchedule.final_ratio must be in [0, 1], got {self.final_ratio}")

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    @property
    def final_lr(self) -> float:
        return self.peak_lr * self.final_ratio

    def lr(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        if step >= self.total_steps or self.decay_steps == 0:
            return self.final_lr
        p = (step - self.decay_start) / self.decay_steps
        return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * p))

    __call__ = lr

    def decay_started(self, step: int) -> bool:
        """True from the first step of the decay phase on (the MTP weight switch point)."""
        return step >= self.decay_start


def mtp_weight(step: int, schedule: WSDSchedule, before: float = 0.3, after: float = 0.1) -> float:
    """MTP loss weight lambda (spec 5, 6.2): 0.3 for most of training, 0.1 once the LR decay has started."""
    return after if schedule.decay_started(step) else before
