"""Scoring a model on held-out data: bits per byte (language modelling) or accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attention.models.output import ModelOutput
from sparse_attention.training import distributed, runtime
from sparse_attention.training.data import LanguageModelingData
from sparse_attention.training.distributed import Processes


def to_device(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _inputs(batch: dict) -> dict:
    """The model's keyword inputs besides input_ids: padding, or packed documents."""
    inputs = {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}
    if "key_padding_mask" in batch:
        inputs["key_padding_mask"] = batch["key_padding_mask"]
    return inputs


def forward(model: nn.Module, batch: dict) -> ModelOutput:
    """The model's output and mean loss on a batch of either task."""
    if "targets" in batch:
        return model(batch["input_ids"], targets=batch["targets"], **_inputs(batch))
    return model(batch["input_ids"], labels=batch["labels"], **_inputs(batch))


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's logits on a batch of either task."""
    return model(batch["input_ids"], **_inputs(batch)).logits


@torch.no_grad()
def evaluate(model: nn.Module, data, *, token_bytes: torch.Tensor | None, batch_size: int,
             max_batches: int | None, device: torch.device, precision: str,
             processes: Processes = Processes()) -> dict[str, float]:
    """The model's score on the first max_batches * batch_size items of data (all of them
    when max_batches is None), split over the processes.

    Language modelling: loss (nats per token) and bits_per_byte (summed nats over the bytes
    the predicted tokens stand for, in bits). Classification: loss and accuracy. Both: the
    number of items (sequences) scored, as "sequences"."""
    count = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    if count >= processes.world_size:  # every process runs as many batches (FSDP needs it)
        count -= count % processes.world_size
    if count == 0:
        raise ValueError("data: nothing to evaluate on (no validation sequences)")
    language_modelling = isinstance(data, LanguageModelingData)
    mine = list(range(processes.rank, count, processes.world_size))
    was_training = model.training
    model.eval()
    # Sums: loss (nats), items (tokens or sequences), and bytes (LM) or correct answers.
    totals = [0.0, 0.0, 0.0]
    try:
        for start in range(0, len(mine), batch_size):
            batch = to_device(data.collate(mine[start:start + batch_size]), device)
            with runtime.autocast(device, precision):
                scores = logits(model, batch).float()
            if language_modelling:
                targets = batch["targets"]
                totals[0] += F.cross_entropy(scores.flatten(0, 1), targets.flatten(), reduction="sum").item()
                totals[1] += targets.numel()
                totals[2] += token_bytes.to(device)[targets].sum().item()
            else:
                labels = batch["labels"]
                totals[0] += F.cross_entropy(scores, labels, reduction="sum").item()
                totals[1] += labels.numel()
                totals[2] += (scores.argmax(-1) == labels).sum().item()
    finally:
        model.train(was_training)
    loss, items, third = distributed.sum_over_ranks(totals, processes, device)
    if language_modelling:
        return {"loss": loss / items, "bits_per_byte": loss / math.log(2) / max(third, 1), "sequences": count}
    return {"loss": loss / items, "accuracy": third / items, "sequences": count}


def scored_count(scored: int, total: int) -> str:
    """"56" when every item was scored, "8 of 56" for a subset."""
    return str(scored) if scored == total else f"{scored} of {total}"
