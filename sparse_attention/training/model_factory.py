"""The model a training run trains, built from its settings and its data."""

from __future__ import annotations

from torch import nn

from sparse_attention.models import (
    SparseClassifierConfig, SparseTransformerClassifier, SparseTransformerConfig, SparseTransformerLM,
)
from sparse_attention.training.config import TrainConfig


def model_config(config: TrainConfig, vocab_size: int, num_classes: int | None = None) -> SparseTransformerConfig:
    """The model's config."""
    common = dict(
        vocab_size=vocab_size, max_seq_len=config.seq_len, d_model=config.d_model,
        num_layers=config.num_layers, num_heads=config.num_heads, d_ff=config.d_ff,
        block_size=config.block_size, pattern=config.pattern,
        pattern_params=dict(config.pattern_params), positions=config.positions,
        dropout=config.dropout, gradient_checkpointing=config.gradient_checkpointing,
        sdpa_max_len=config.sdpa_max_len,
    )
    if config.task == "classify":
        return SparseClassifierConfig(num_classes=num_classes, pooling=config.pooling, **common)
    return SparseTransformerConfig(**common)


def build_model(model_config: SparseTransformerConfig) -> nn.Module:
    if isinstance(model_config, SparseClassifierConfig):
        return SparseTransformerClassifier(model_config)
    return SparseTransformerLM(model_config)


def model_class(model_config_dict: dict) -> type:
    """The model class a saved config.json belongs to (classifiers have num_classes)."""
    return SparseTransformerClassifier if "num_classes" in model_config_dict else SparseTransformerLM
