"""What the models' forward returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """logits, and the mean cross-entropy loss when labels or targets were given (else None)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
