"""Learning-rate schedules as pure functions of the step, and a scheduler that learns its length late.

The total number of steps is only known once Lightning has set up the training data. Asking for it
inside ``configure_optimizers`` (``trainer.estimated_stepping_batches``) sets the data up before a
resumed run's loop state is restored, and the dataloader's saved position is then never loaded; so
the total is read at the first real step instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, warmup: int, shape: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then ``shape`` down to 0."""
    if step < warmup:
        return step / max(1, warmup)
    if shape == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {shape!r}; expected 'constant', 'linear' or 'cosine'")


def deferred_schedule(
    optimizer: Optimizer, total_steps: Callable[[], int], warmup_ratio: float, shape: str
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`, calling ``total_steps()`` only from step 1 on."""
    cache: dict[str, int] = {}

    def factor(step: int) -> float:
        if step == 0:
            return 0.0 if warmup_ratio > 0 else 1.0
        if "total" not in cache:
            cache["total"] = max(1, int(total_steps()))
        total = cache["total"]
        return lr_factor(step, total, math.ceil(warmup_ratio * total), shape)

    return LambdaLR(optimizer, factor)
