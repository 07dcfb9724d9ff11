"""extend_position_embeddings(): longer inputs for models with learned position tables.

As DeepSpeed's `extend_position_embedding` did for BERT and RoBERTa: the learned table is repeated to the
new length (positions past the old maximum start over with the learned rows), so a model
fine-tuned on long inputs starts from embeddings it knows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Attribute names of learned absolute position tables (BERT-style encoders, GPT-2).
POSITION_TABLE_NAMES = ("position_embeddings", "wpe")
# Buffers of length max_position_embeddings that some embeddings keep: name -> new contents.
POSITION_BUFFERS = {
    "position_ids": lambda length, like: torch.arange(length, device=like.device, dtype=like.dtype),
    "token_type_ids": lambda length, like: torch.zeros(length, device=like.device, dtype=like.dtype),
}


def _model_type(model) -> str:
    return getattr(model.config, "model_type", None) or type(model).__name__


def _position_tables(model, length: int) -> list[nn.Embedding]:
    tables = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES:
            if module.num_embeddings != length:
                raise ValueError(
                    f"max_length: {_model_type(model)}'s position table {name} has "
                    f"{module.num_embeddings} rows, not max_position_embeddings={length}; "
                    f"it is not extended here"
                )
            tables.append(module)
    return tables


def _first_position(table: nn.Embedding) -> int:
    """Row of position 0: RoBERTa-style tables count positions from padding_idx + 1."""
    return 0 if table.padding_idx is None else table.padding_idx + 1


def _has_rotary_embeddings(model) -> bool:
    return any(name.rsplit(".", 1)[-1] == "rotary_emb" for name, _ in model.named_modules())


@torch.no_grad()
def extend_position_embeddings(model, max_length: int) -> bool:
    """Lets `model` read inputs of up to max_length tokens.

    Learned position tables (and the position_ids / token_type_ids buffers that go with them)
    are extended by repeating their rows, and config.max_position_embeddings set to max_length
    (plus the rows before position 0 in RoBERTa-style tables, whose positions start after
    padding_idx; those rows are kept).
    Models with rotary embeddings need nothing and are left as they are. Returns True when a
    table was extended. Raises ValueError for a model with neither."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
    config = model.config.get_text_config()
    length = getattr(config, "max_position_embeddings", None)
    tables = _position_tables(model, length) if length is not None else []
    if not tables:
        if _has_rotary_embeddings(model):
            return False
        raise ValueError(
            f"max_length: {_model_type(model)} has no learned position table "
            f"({' or '.join(POSITION_TABLE_NAMES)}) and no rotary embeddings; its positions "
            f"cannot be extended here"
        )
    first = {_first_position(table) for table in tables}
    if len(first) != 1:
        raise ValueError(f"max_length: {_model_type(model)}'s position tables start at rows {first}")
    first = first.pop()
    new_length = first + max_length
    if new_length <= length:
        return False
    for table in tables:
        learned = table.weight[first:]
        repeats = math.ceil(max_length / len(learned))
        weight = torch.cat([table.weight[:first], learned.repeat(repeats, 1)[:max_length]])
        table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
        table.num_embeddings = new_length
    for module in model.modules():
        for name, make in POSITION_BUFFERS.items():
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.shape[-1] == length:
                persistent = name not in module._non_persistent_buffers_set
                new = make(new_length, buffer).expand(*buffer.shape[:-1], new_length)
                module.register_buffer(name, new, persistent=persistent)
    config.max_position_embeddings = new_length
    return True
