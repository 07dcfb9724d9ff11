"""The mask function registered with transformers' AttentionMaskInterface.

transformers builds each layer's mask from a mask function (causal, bidirectional, sliding
window, ...) and a 2D padding mask. Instead of expanding them into a [B, 1, Nq, Nk] tensor, as
its SDPA path does (O(N^2) memory), `token_rules_mask` recognises the mask functions that the
op's element rules express and returns them as `TokenRules`: causal, window, key padding, and
packed documents (transformers' packed-sequence form of those masks, built when position_ids
restart inside a row). Any other mask function (image-token overlays, chunked attention) is
expanded
like SDPA's into a `PositionedMask`, and the attention function then takes its dense fallback:
a mask is never dropped.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import masking_utils


@dataclasses.dataclass(frozen=True)
class TokenRules:
    """A transformers mask in the op's terms.

    Attributes:
        causal: query i sees key j only if j <= i + key_count - Nq (positions aligned at the end,
            as the op aligns them).
        window: the op's (left, right) token window, or None.
        key_count: keys in use. A static cache holds more, past every query's causal horizon;
            the attention function drops them.
        key_offset: absolute position of the first key (> 0 when a sliding-window cache has
            dropped the oldest keys).
        key_padding_mask: bool [B, key_count], True = ignore, or None when nothing is padded.
        documents: int [B, Nq] document index of every token when the rows hold packed
            documents (transformers' packed sequence mask), each attended alone; or None.
    """

    causal: bool
    window: tuple[int | None, int | None] | None
    key_count: int
    key_offset: int = 0
    key_padding_mask: torch.Tensor | None = None
    documents: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class PositionedMask:
    """A mask the op's rules cannot express, with the absolute positions it covers.

    Attributes:
        mask: bool [B, 1, Nq, Nk], True = attend (transformers' SDPA mask).
        q_offset: absolute position of the first query.
        kv_offset: absolute position of the first key.
    """

    mask: torch.Tensor
    q_offset: int
    kv_offset: int


def _closure(function) -> dict:
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _code(function):
    return getattr(function, "__code__", None)


_AND_CODE = _code(masking_utils.and_masks(masking_utils.causal_mask_function))
_CAUSAL_WINDOW_CODE = _code(masking_utils.sliding_window_overlay(1))
_TWO_SIDED_WINDOW_CODE = _code(masking_utils.sliding_window_bidirectional_overlay(1))
_REMAP_CODE = _code(masking_utils.remap_positions_for_packed_sequence(
    masking_utils.causal_mask_function, None))
_PACKED_CODE = _code(masking_utils.packed_sequence_mask_function(None))


def _unpacked(mask_function):
    """(the mask function within each document, document index [B, N]) of transformers'
    packed form and_masks(remap_positions_for_packed_sequence(f, position_ids),
    packed_sequence_mask_function(documents)); (mask_function, None) for any other."""
    if _code(mask_function) is not _AND_CODE:
        return mask_function, None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2 or _code(parts[0]) is not _REMAP_CODE or _code(parts[1]) is not _PACKED_CODE:
        return mask_function, None
    return _closure(parts[0])["mask_function"], _closure(parts[1])["packed_sequence_mask"]


def _rule(mask_function) -> tuple[bool, tuple[int | None, int | None] | None] | None:
    """(causal, window) of the mask functions transformers builds for causal, bidirectional
    and sliding-window attention (read from their closures); None for any other, which then
    takes the dense fallback: a transformers release that builds them differently gets
    correct, slower attention, never a dropped mask."""
    if mask_function is masking_utils.causal_mask_function:
        return True, None
    if mask_function is masking_utils.bidirectional_mask_function:
        return False, None
    if _code(mask_function) is not _AND_CODE:
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    overlay, base = parts
    width = _closure(overlay).get("sliding_window") if _code(overlay) else None
    if isinstance(width, bool) or not isinstance(width, int):
        return None
    # sliding_window_overlay keeps kv > q - width; the bidirectional one |q - kv| <= width.
    if _code(overlay) is _CAUSAL_WINDOW_CODE and base is masking_utils.causal_mask_function and width >= 1:
        return True, (width - 1, None)
    if (_code(overlay) is _TWO_SIDED_WINDOW_CODE and base is masking_utils.bidirectional_mask_function
            and width >= 0):
        return False, (width, width)
    return None


def _key_padding_mask(attention_mask, kv_length: int, kv_offset: int, key_count: int):
    # Passed on even when nothing is padded: asking the data would stop torch.compile's
    # graph, and the kernels skip the mask on key blocks without padding anyway.
    keep = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if keep is None:
        return None
    return ~keep[:, kv_offset:kv_offset + key_count].bool()


def token_rules_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """TokenRules for the masks the op expresses; otherwise SDPA's bool mask [B, 1, Nq, Nk] as
    a PositionedMask.

    Same arguments as transformers' `sdpa_mask`; attention_mask is the 2D padding mask
    (True = keep) over the keys seen so far."""
    within, documents = _unpacked(mask_function)
    rule = _rule(within)
    q_offset = int(q_offset)  # static caches give it as a tensor
    if documents is not None and rule is not None:
        # transformers packs only without a cache and a padding mask: one square per row.
        causal, window = rule
        return TokenRules(causal=causal, window=window, key_count=kv_length, documents=documents)
    if rule is not None:
        causal, window = rule
        # Keys after the last query are past every query's horizon under causal attention.
        key_count = q_offset + q_length - kv_offset if causal else kv_length
        # The op measures windows from the diagonal through the last query and the last key.
        aligned = causal or q_offset + q_length == kv_offset + kv_length
        if 1 <= key_count <= kv_length and (window is None or aligned):
            return TokenRules(
                causal=causal, window=window, key_count=key_count, key_offset=kv_offset,
                key_padding_mask=_key_padding_mask(attention_mask, kv_length, kv_offset, key_count),
            )
    for skip in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(skip, None)
    mask = masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs,
    )
    return PositionedMask(mask, q_offset, kv_offset)
