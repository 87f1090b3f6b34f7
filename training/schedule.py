"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (the reference recipe:
lr 1e-4 -> 1e-6 with 377 warm-up steps).

Per optimizer step ``s`` (0-based, the step about to be taken) and base rate ``lr`` of a
parameter group::

    s <  warmup:  lr * (s + 1) / warmup
    s >= warmup:  min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,   p = (s - warmup) / (total - warmup)

``p`` is clipped to [0, 1], so steps past ``total`` stay at ``min_lr``. A group whose base rate
is below ``min_lr`` (e.g. a frozen-ish group at lr 0) keeps its base rate as its floor.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """The learning rate for optimizer step ``step`` (see the module docstring)."""
    floor = min(min_lr, base_lr)
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class WarmupCosineLR(LRScheduler):
    """``torch`` scheduler for :func:`warmup_cosine_lr`; call ``step()`` after each optimizer step.

    Its ``state_dict`` holds plain numbers only (safe to load with ``weights_only=True``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
            )
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = max(0, self.last_epoch)
        return [
            warmup_cosine_lr(step, base, self.warmup_steps, self.total_steps, self.min_lr)
            for base in self.base_lrs
        ]
