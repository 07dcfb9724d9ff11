"""The learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The multiple of the peak learning rate used for optimizer step `step` (0-based).

    Warm-up rises linearly to 1 over warmup_steps; the cosine then falls to min_ratio at
    decay_steps and stays there (a resumed run that goes on past it keeps the floor)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(decay_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, decay_steps, min_ratio))
