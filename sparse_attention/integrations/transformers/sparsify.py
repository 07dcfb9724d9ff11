"""sparsify(): switch an existing transformers model to the block-sparse op."""

from __future__ import annotations

from transformers import PreTrainedModel

from sparse_attention.integrations.transformers.positions import extend_position_embeddings
from sparse_attention.integrations.transformers.register import check_pattern, register
from sparse_attention.patterns import Pattern


def _check_supported(model: PreTrainedModel) -> None:
    if not (model.is_backend_compatible() and model._can_set_attn_implementation()):
        raise ValueError(
            f"model: {model.config.model_type} ({type(model).__name__}) is not supported: its "
            f"attention does not go through transformers' AttentionInterface"
        )


def _check_heads(model: PreTrainedModel, pattern: Pattern) -> None:
    heads = getattr(model.config.get_text_config(), "num_attention_heads", None)
    if heads is None:
        return
    try:
        pattern.check_num_heads(heads)
    except ValueError as error:
        raise ValueError(
            f"pattern: does not fit {model.config.model_type}'s num_attention_heads={heads}: {error}"
        ) from None


def sparsify(model: PreTrainedModel, pattern: Pattern, *, max_length: int | None = None,
             name: str = "sparse_attention", ignore_dropout: bool = False) -> PreTrainedModel:
    """Runs every attention layer of `model` on the block-sparse op with `pattern`.

    Registers `pattern` under `name` (see `register`) and sets the model's attention
    implementation to it. With max_length, models with learned position tables (GPT-2,
    BERT-style encoders) get them extended to max_length positions by repeating the learned
    rows (see `extend_position_embeddings`). Returns the model, changed in place.

    Raises ValueError for a model whose attention does not go through transformers'
    AttentionInterface, and for a pattern made for another head count."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    _check_supported(model)
    _check_heads(model, check_pattern(pattern))
    register(name, pattern=pattern, ignore_dropout=ignore_dropout)
    if max_length is not None:
        extend_position_embeddings(model, max_length)
    model.set_attn_implementation(name)
    return model
