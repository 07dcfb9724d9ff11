"""The data of a run, prepared from its settings."""

from __future__ import annotations

from pathlib import Path

from sparse_attention.training.config import TrainConfig
from sparse_attention.training.data import PreparedData, prepare_data


def prepare_run_data(config: TrainConfig, *, tokenizer_folder: Path | None = None,
                     label_names: list[str] | None = None) -> PreparedData:
    """config's documents, split, tokenized (with the saved tokenizer when tokenizer_folder is
    given, as a resumed or evaluated run must) and cut into sequences."""
    return prepare_data(
        config.data, task=config.task, seq_len=config.seq_len, block_size=config.block_size,
        tokenizer=config.tokenizer, vocab_size=config.vocab_size,
        validation_fraction=config.validation_fraction, seed=config.seed, glob=config.glob,
        text_field=config.text_field, label_field=config.label_field,
        max_bytes=config.max_data_bytes, tokenizer_folder=tokenizer_folder, label_names=label_names,
        packing=config.packing)
