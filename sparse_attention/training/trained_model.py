"""A trained model loaded back from a run folder or checkpoint, with its tokenizer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from sparse_attention.models.pretrained import CONFIG_FILE
from sparse_attention.training.checkpoint import CheckpointError, checkpoint_step, find_checkpoint
from sparse_attention.training.config import TrainConfig, read_config_file, resolve
from sparse_attention.training.data import load_tokenizer
from sparse_attention.training.model_factory import model_class
from sparse_attention.training.state import TOKENIZER_FOLDER, TRAIN_CONFIG_FILE, load_labels


@dataclasses.dataclass
class TrainedModel:
    model: nn.Module
    tokenizer: object
    config: TrainConfig
    label_names: list[str] | None
    step: int
    folder: Path


def load_trained(path: str | Path, device: torch.device) -> TrainedModel:
    """The model of the latest checkpoint of a run folder (or of one checkpoint folder)."""
    try:
        folder = find_checkpoint(Path(path))
    except CheckpointError as error:
        if Path(path).is_file():
            raise CheckpointError(f"--checkpoint: {error}") from None
        raise
    config = resolve(read_config_file(folder / TRAIN_CONFIG_FILE))
    model_type = model_class(json.loads((folder / CONFIG_FILE).read_text()))
    model = model_type.from_pretrained(folder, device=device).eval()
    return TrainedModel(model, load_tokenizer(folder / TOKENIZER_FOLDER), config, load_labels(folder),
                        checkpoint_step(folder), folder)
