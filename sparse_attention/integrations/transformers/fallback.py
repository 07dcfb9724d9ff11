"""The dense fallback: SDPA with a mask that the op cannot run, intersected with the pattern.

Used for masks the op's rules cannot express (custom 4D masks, overlays) and
for sparse patterns over sliding-window caches that dropped keys (the pattern's blocks no
longer line up with the keys). The pattern is laid at the queries' and keys' absolute
positions, so the result is what the op computes on the full sequence. Soft-capping and
sinks, which SDPA does not take, are computed by attention written out here.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_attention.integrations.transformers.masks import PositionedMask, TokenRules
from sparse_attention.layout import BlockLayout
from sparse_attention.patterns import Dense, Pattern
from sparse_attention.element_rules import element_mask


def rules_as_mask(rules: TokenRules, q_len: int, device) -> PositionedMask:
    """The rules as an element mask [B or 1, 1, Nq, key_count] at their absolute positions."""
    everything = Dense(block_size=16).layout(q_len, rules.key_count)
    mask = element_mask(everything, q_len, rules.key_count, causal=rules.causal,
                        window=rules.window, key_padding_mask=rules.key_padding_mask,
                        device=device)
    return PositionedMask(mask, q_offset=rules.key_offset + rules.key_count - q_len,
                          kv_offset=rules.key_offset)


def _pattern_mask(pattern: Pattern, positioned: PositionedMask, num_heads: int, q_len: int,
                  k_len: int, device) -> torch.Tensor:
    """The pattern's element mask [1, H or 1, Nq, Nk] at the mask's absolute positions: the
    rows and columns of the pattern's square layout that these queries and keys occupy.

    Only the square's corner from the first block that holds one of them on is expanded, so a
    decoding step far into a sequence costs about (Nq + Nk)^2, not the square's size^2."""
    size = max(positioned.q_offset + q_len, positioned.kv_offset + k_len)
    layout = pattern.layout(size, size, num_heads=num_heads, causal=pattern.causal)
    first_block = min(positioned.q_offset, positioned.kv_offset) // layout.block_size
    start = first_block * layout.block_size
    corner = BlockLayout(layout.mask[:, first_block:, first_block:], layout.block_size)
    # A square: its diagonal is the same wherever it starts, so the element rules carry over.
    square = element_mask(corner, size - start, size - start, causal=pattern.causal,
                          window=pattern.token_window, device=device)
    rows, columns = positioned.q_offset - start, positioned.kv_offset - start
    return square[..., rows:rows + q_len, columns:columns + k_len]


def place_caller_mask(mask: torch.Tensor, q_len: int, k_len: int) -> PositionedMask:
    """A caller's 4D mask, its queries taken as the last Nq of the keys' positions (as after
    a dynamic cache: the op's own alignment)."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, k_len) or q_len > k_len:
        raise ValueError(
            f"attention_mask: expected a 4D mask [B, 1, {q_len}, {k_len}] (with no more queries "
            f"than keys) or one built by transformers' mask functions, got shape "
            f"{tuple(mask.shape)}"
        )
    return PositionedMask(mask, q_offset=k_len - q_len, kv_offset=0)


def _attention_with_terms(query, key, value, mask, scaling, softcap, sinks, dropout_p):
    """Attention with soft-capping and sinks, as the op applies them (softcap on the scaled
    scores, then the mask, then the sinks in the denominator); a row that sees no key gives 0.
    Returns [B, Nq, H, D]."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    key, value = (t.to(dtype).repeat_interleave(groups, dim=1) for t in (key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.to(dtype) @ key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    # Zeros in rows that see no key keep -inf - -inf out of softmax and its gradient.
    seen = scores.isfinite().any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~seen, 0.0)
    if sinks is not None:
        sink = sinks.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs.masked_fill(~seen, 0.0), p=dropout_p)
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous()


def masked_dense_attention(module, query, key, value, positioned: PositionedMask, pattern: Pattern,
                           scaling, reason: str, terms: dict | None = None):
    """Dense SDPA with a mask, intersected with the pattern's element mask at the mask's
    positions: what the op would compute, in O(Nq * Nk) memory. Warns, giving the reason.
    terms: the call's score terms (`terms.model_terms`); dropout draws torch's bits, not the
    kernels'."""
    terms = terms or {}
    q_len = query.shape[2]
    # Keys after the last query that no query sees (a static cache's empty slots) are dropped,
    # so that the pattern is laid over the same positions as on the op's path.
    seen = positioned.q_offset + q_len - positioned.kv_offset
    if 0 < seen < key.shape[2] and not positioned.mask[..., seen:].any():
        key, value = key[:, :, :seen], value[:, :, :seen]
        positioned = dataclasses.replace(positioned, mask=positioned.mask[..., :seen])
    k_len = key.shape[2]
    warnings.warn(
        f"sparse_attention: {type(module).__name__}: {reason}; running dense SDPA with the "
        f"pattern applied as a mask instead (O(Nq * Nk) memory)",
        stacklevel=3,
    )
    keep = _pattern_mask(pattern, positioned, query.shape[1], q_len, k_len, query.device)
    mask = positioned.mask
    if mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    dropout_p = terms.get("dropout_p", 0.0)
    if terms.get("softcap") is not None or terms.get("sinks") is not None:
        return _attention_with_terms(query, key, value, mask, scaling, terms.get("softcap"),
                                     terms.get("sinks"), dropout_p), None
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout_p,
                                  scaling=scaling, is_causal=False)
