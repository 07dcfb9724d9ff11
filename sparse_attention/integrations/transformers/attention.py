"""The attention function registered with transformers' AttentionInterface.

Models call it as `attention(module, query, key, value, attention_mask, dropout=,
scaling=, sliding_window=, ...)` with query [B, H, Nq, D] and key, value [B, Hkv, Nk, D]
(GQA when Hkv < H), and expect (output [B, Nq, H, D], attention weights or None).
"""

from __future__ import annotations

import warnings

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_attention.attention import sparse_attention
from sparse_attention.integrations.transformers.masks import TokenRules
from sparse_attention.patterns import Dense, Pattern
from sparse_attention.reference import element_mask

# Arguments some models pass that change attention in ways the op does not compute.
UNSUPPORTED_ARGUMENTS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
}


def _check_arguments(module, dropout: float, ignore_dropout: bool, kwargs: dict) -> None:
    model = type(module).__name__
    for name, meaning in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{name}: {model} asks for {meaning}, which sparse_attention does not compute; "
                f"use attn_implementation='sdpa' or 'eager' for this model"
            )
    if dropout and not ignore_dropout:
        raise ValueError(
            f"dropout: {model} asks for attention dropout p={dropout} in training, which the "
            f"sparse_attention kernels do not apply; set the config's attention dropout to 0, or "
            f"register(..., ignore_dropout=True) to train without it"
        )


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
    if rules.key_offset and not isinstance(pattern, Dense):
        raise ValueError(
            f"pattern: {pattern!r} is laid out on absolute positions, but this layer's cache "
            f"kept only the keys from position {rules.key_offset} on (a sliding-window cache); "
            f"use a cache that keeps every key, or the Dense pattern with the model's window"
        )


def masked_dense_attention(module, query, key, value, mask: torch.Tensor, pattern: Pattern, scaling):
    """Dense SDPA with a 4D mask that the op's rules cannot express, intersected with the
    pattern's element mask: the same result as the op would give, in O(Nq * Nk) memory."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, k_len):
        raise ValueError(
            f"attention_mask: expected a 4D mask ending in ({q_len}, {k_len}) or one built by "
            f"transformers' mask functions, got shape {tuple(mask.shape)}"
        )
    warnings.warn(
        f"sparse_attention: {type(module).__name__} got a mask that the block-sparse kernels "
        f"cannot express (a custom 4D mask, packed sequences or an overlay); running dense SDPA "
        f"with the pattern applied as a mask instead (O(N^2) memory)",
        stacklevel=3,
    )
    layout = pattern.layout(q_len, k_len, num_heads=query.shape[1], causal=pattern.causal)
    keep = element_mask(layout, q_len, k_len, causal=pattern.causal, window=pattern.token_window,
                        device=query.device)
    if mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    # No dropout here either, so that both paths compute the same thing.
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, is_causal=False)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      sliding_window: int | None = None, *, pattern: Pattern,
                      ignore_dropout: bool = False, **kwargs):
    """transformers attention function running the block-sparse op with `pattern`.

    attention_mask is what `token_rules_mask` built (TokenRules), None, or a 4D mask (from a
    mask function the op cannot express, or passed by the caller), which takes the dense
    fallback. Query rows that see no key (left padding under causal attention) give 0, as
    transformers' SDPA path gives for them. Returns (output [B, Nq, H, D], None)."""
    _check_arguments(module, dropout, ignore_dropout, kwargs)
    if isinstance(attention_mask, torch.Tensor):
        return masked_dense_attention(module, query, key, value, attention_mask, pattern, scaling)
    if attention_mask is None:
        rules = _rules_without_mask(module, key, is_causal, sliding_window)
    elif isinstance(attention_mask, TokenRules):
        rules = attention_mask
    else:
        raise TypeError(
            f"attention_mask: expected a tensor, None or TokenRules, got {type(attention_mask).__name__}"
        )
    _check_pattern_fits(pattern, rules, module)
    key, value = key[:, :, :rules.key_count], value[:, :, :rules.key_count]
    out = sparse_attention(query, key, value, pattern, causal=rules.causal, scale=scaling,
                           key_padding_mask=rules.key_padding_mask, window=rules.window)
    return out.transpose(1, 2).contiguous(), None
