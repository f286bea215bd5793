"""The learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` of the peak.

    factor(s) = (s + 1) / warmup                                     s < warmup
              = r + (1 - r) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2   otherwise
    (s: 0-based optimizer step; r = min_lr_ratio; steps past `total` stay at r)

The length is `schedule.total_steps`, never `max_steps`: a run stopped early and resumed, or runs
with different `max_steps`, follow one curve.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate at 0-based optimizer step `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor` (its state_dict goes into the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps,
                                       min_lr_ratio=min_lr_ratio))
