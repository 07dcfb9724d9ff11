"""The attention function registered with transformers' AttentionInterface.

Models call it as `attention(module, query, key, value, attention_mask, dropout=,
scaling=, sliding_window=, softcap=, s_aux=, ...)` with query [B, H, Nq, D] and key, value
[B, Hkv, Nk, D] (GQA when Hkv < H), and expect (output [B, Nq, H, D], attention weights or
None).
"""

from __future__ import annotations

import torch

from sparse_attention.attention import sparse_attention
from sparse_attention.integrations.transformers.fallback import (
    masked_dense_attention, place_caller_mask, rules_as_mask,
)
from sparse_attention.integrations.transformers.masks import PositionedMask, TokenRules
from sparse_attention.integrations.transformers.packed import call_documents, packed_attention
from sparse_attention.integrations.transformers.terms import model_terms
from sparse_attention.patterns import Dense, Pattern


def _rules_without_mask(module, key, is_causal, sliding_window) -> TokenRules:
    """Rules for a call that got no mask (no padding, or a model that builds none): the
    module's own causality and window, query and key positions aligned at the end."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    if sliding_window is not None:
        window = (sliding_window - 1, None) if causal else (sliding_window, sliding_window)
    return TokenRules(causal=bool(causal), window=window, key_count=key.shape[2])


def _check_pattern_fits(pattern: Pattern, rules: TokenRules, module) -> None:
    if pattern.causal and not rules.causal:
        raise ValueError(
            f"pattern: {pattern!r} is causal by definition, but {type(module).__name__} attends "
            f"bidirectionally; use a bidirectional pattern"
        )


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      sliding_window: int | None = None, *, pattern: Pattern,
                      ignore_dropout: bool = False, **kwargs):
    """transformers attention function running the block-sparse op with `pattern`.

    attention_mask is what `token_rules_mask` built, or None (no mask: the module's causality
    and sliding_window apply). TokenRules run the op, except over a sliding-window cache that
    dropped keys with a sparse pattern; that, a PositionedMask (a mask the op cannot express)
    and a 4D mask passed by the caller take the dense fallback. Packed documents (the
    cu_seq_lens_q / cu_seq_lens_k kwargs, or position_ids that restart: see `packed`) run
    on the op's cu_seqlens, each document attended alone. Query rows that
    see no key (left padding under causal attention) give 0, as transformers' SDPA path gives
    for them. Soft-capping (softcap), sinks (s_aux) and attention dropout in training run on
    the op's score terms, on every path (see `terms`). Returns (output [B, Nq, H, D], None)."""
    terms = model_terms(module, dropout, ignore_dropout, kwargs)
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = place_caller_mask(attention_mask, query.shape[2], key.shape[2])
    if isinstance(attention_mask, PositionedMask):
        return masked_dense_attention(
            module, query, key, value, attention_mask, pattern, scaling,
            "a mask that the block-sparse kernels cannot express (a custom 4D mask or an "
            "overlay)", terms,
        )
    if attention_mask is None:
        rules = _rules_without_mask(module, key, is_causal, sliding_window)
    elif isinstance(attention_mask, TokenRules):
        rules = attention_mask
    else:
        raise TypeError(
            f"attention_mask: expected a tensor, None, TokenRules or PositionedMask, got "
            f"{type(attention_mask).__name__}"
        )
    _check_pattern_fits(pattern, rules, module)
    key, value = key[:, :, :rules.key_count], value[:, :, :rules.key_count]
    documents = call_documents(rules, query, key, kwargs)
    if documents is not None:
        return packed_attention(query, key, value, pattern, rules, documents, scaling, terms), None
    if rules.key_offset and not isinstance(pattern, Dense):
        # The pattern's blocks start at position 0: they do not line up with keys that start
        # mid-sequence. Such a cache holds about a window of keys, so this is cheap.
        return masked_dense_attention(
            module, query, key, value, rules_as_mask(rules, query.shape[2], query.device),
            pattern, scaling,
            "its sliding-window cache dropped the oldest keys, and the pattern's blocks do not "
            "line up with the keys it kept", terms,
        )
    out = sparse_attention(query, key, value, pattern, causal=rules.causal, scale=scaling,
                           key_padding_mask=rules.key_padding_mask, window=rules.window, **terms)
    return out.transpose(1, 2).contiguous(), None
