"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

The factor is a pure function of the optimizer step, so a resumed run gets exactly the learning
rate an uninterrupted run would have had.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps, reaching 1.0 on the last warm-up step (never 0, so the
    first step is not wasted). Then cosine from 1.0 down to `min_lr_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def budget_lr_factor(step: int, elapsed_s: float, budget_s: float, warmup_steps: int, total_steps: int,
                     min_lr_ratio: float = 0.1) -> float:
    """`lr_factor` for a run with a wall-clock budget: the cosine follows whichever is further along, the
    steps (of `total_steps`) or the time (of `budget_s`), so a run cut by its budget ends at a low rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / decay_steps, elapsed_s / max(budget_s, 1e-9)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """A LambdaLR applying `lr_factor` to every param group's own learning rate.

    The lambda is a plain function (not a callable object), so the scheduler's state dict holds
    only numbers and reloads with ``torch.load(weights_only=True)``.
    """
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return LambdaLR(optimizer, factor)
