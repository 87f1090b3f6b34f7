"""Learning-rate schedules: linear warm-up, then cosine decay to a floor.

``step_cosine`` (the project's choice: ``ctrate-paper``, ``tiny-cpu``), per optimizer step ``s``
(0-based, the step about to be taken) and base rate ``lr`` of a parameter group::

    s <  warmup:  lr * (s + 1) / warmup                  (warmup_start_lr null)
                  start + (lr - start) * s / warmup      (warmup_start_lr = start)
    s >= warmup:  min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,   p = (s - warmup) / (total - warmup)

``p`` is clipped to [0, 1], so steps past ``total`` stay at ``min_lr``. A group whose base rate
is below ``min_lr`` (e.g. a frozen-ish group at lr 0) keeps its base rate as its floor.

``epoch_cosine`` (the public fVLM code's, ``ctrate-base``: LAVIS ``linear_warmup_cosine_lr``
as its runner calls it, before every step with the epoch ``e`` and the step ``i`` within it)::

    e == 0:  min(lr, start + (lr - start) * i / warmup)   (start = warmup_start_lr, or lr if null)
    e >= 1:  min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2

The warm-up lives in the first epoch only (a longer one is cut at its end); after it the rate
changes once per epoch, and never reaches ``min_lr`` (the last epoch is ``epochs - 1``). Steps
are optimizer steps here; the reference counts batches, the same without gradient accumulation.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fvlm_training.recipe import SCHEDULES


def _warmup(step: int, base_lr: float, warmup_steps: int, start_lr: float | None) -> float:
    if start_lr is None:
        return base_lr * (step + 1) / warmup_steps
    return min(base_lr, start_lr + (base_lr - start_lr) * step / max(warmup_steps, 1))


def warmup_cosine_lr(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr: float,
    warmup_start_lr: float | None = None,
) -> float:
    """The ``step_cosine`` learning rate for optimizer step ``step`` (module docstring)."""
    floor = min(min_lr, base_lr)
    if warmup_steps > 0 and step < warmup_steps:
        return _warmup(step, base_lr, warmup_steps, warmup_start_lr)
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def epoch_cosine_lr(
    step: int,
    base_lr: float,
    warmup_steps: int,
    steps_per_epoch: int,
    epochs: int,
    min_lr: float,
    warmup_start_lr: float | None = None,
) -> float:
    """The ``epoch_cosine`` learning rate for optimizer step ``step`` (module docstring)."""
    epoch, i = divmod(step, max(1, steps_per_epoch))
    if epoch == 0:
        start = base_lr if warmup_start_lr is None else warmup_start_lr
        return min(base_lr, start + (base_lr - start) * i / max(warmup_steps, 1))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


class WarmupCosineLR(LRScheduler):
    """``torch`` scheduler for :func:`warmup_cosine_lr` (``schedule="step_cosine"``) or
    :func:`epoch_cosine_lr` (``"epoch_cosine"``, which needs ``steps_per_epoch``; ``total_steps``
    is then ``steps_per_epoch * epochs``); call ``step()`` after each optimizer step.

    Its ``state_dict`` holds plain numbers only (safe to load with ``weights_only=True``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
        *,
        schedule: str = "step_cosine",
        warmup_start_lr: float | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule == "epoch_cosine" and not steps_per_epoch:
            raise ValueError("the epoch_cosine schedule needs steps_per_epoch >= 1")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        self.schedule = schedule
        self.warmup_start_lr = None if warmup_start_lr is None else float(warmup_start_lr)
        self.steps_per_epoch = int(steps_per_epoch or total_steps)
        super().__init__(optimizer, last_epoch)

    def rate(self, step: int, base: float) -> float:
        """The rate of a group with base rate ``base`` at optimizer step ``step``."""
        if self.schedule == "epoch_cosine":
            epochs = max(1, round(self.total_steps / self.steps_per_epoch))
            return epoch_cosine_lr(
                step, base, self.warmup_steps, self.steps_per_epoch, epochs, self.min_lr, self.warmup_start_lr
            )
        return warmup_cosine_lr(
            step, base, self.warmup_steps, self.total_steps, self.min_lr, self.warmup_start_lr
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = max(0, self.last_epoch)
        return [self.rate(step, base) for base in self.base_lrs]
