"""register(): make a pattern available to transformers as an attn_implementation."""

from __future__ import annotations

import functools

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparse_attention.integrations.transformers.attention import attention_forward
from sparse_attention.integrations.transformers.masks import token_rules_mask
from sparse_attention.patterns import Pattern

# transformers' own implementations: registering one of these names would replace it for
# every model.
RESERVED_NAMES = frozenset(AttentionInterface._global_mapping) | frozenset(
    AttentionMaskInterface._global_mapping) | {"eager"}


def check_pattern(pattern) -> Pattern:
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern: expected a sparse_attention Pattern (or sparsity config), got "
            f"{type(pattern).__name__}"
        )
    return pattern


def register(name: str = "sparse_attention", *, pattern: Pattern,
             ignore_dropout: bool = False) -> str:
    """Registers the block-sparse op with `pattern` as transformers attention implementation
    `name`, with its mask function (without which transformers would pass no causal mask).

    Then `AutoModel*.from_config(cfg, attn_implementation=name)` or
    `model.set_attn_implementation(name)` runs every attention layer of a supported model
    (one whose attention goes through transformers' AttentionInterface) on the op. The name
    is global: registering it again rebinds every model that uses it.

    Args:
        name: the attn_implementation name.
        pattern: a sparse_attention Pattern (or DeepSpeed-style sparsity config); its layout is
            built for each layer's query and key lengths and head count.
        ignore_dropout: train without the attention dropout that a model's config asks for
            (by default it is applied, on the kernels' Philox bits, seeded from torch's
            default generator).

    Returns the name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"name: {name!r} is one of transformers' own attention implementations")
    check_pattern(pattern)
    if not isinstance(ignore_dropout, bool):
        raise TypeError(f"ignore_dropout: expected a bool, got {ignore_dropout!r}")
    function = functools.partial(attention_forward, pattern=pattern, ignore_dropout=ignore_dropout)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, token_rules_mask)
    return name
