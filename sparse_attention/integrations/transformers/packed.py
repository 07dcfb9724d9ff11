"""Packed batches: documents side by side in a row, each attended alone, on the op's
cu_seqlens.

transformers marks them in three ways, taken in this order (FlashAttention's):
- the `cu_seq_lens_q` / `cu_seq_lens_k` kwargs (DataCollatorWithFlattening with
  return_flash_attn_kwargs=True), offsets over the batch flattened into one row;
- the packed sequence mask that its causal mask functions build when position_ids restart
  inside a row without a padding mask or cache (TokenRules.documents);
- position_ids that restart, in a call without a padding mask whose queries are all its keys:
  encoders' masks never look at them, nor do causal masks over a fresh cache (use_cache
  defaults to True), but transformers' FlashAttention path does, so they are found as it
  finds them, with its own `find_packed_sequence_indices`.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import find_packed_sequence_indices

from sparse_attention.documents import attention_over_rows, cu_seqlens_from_ids
from sparse_attention.integrations.transformers.masks import TokenRules


def _offsets(name: str, cu) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name}: expected an int tensor [documents + 1], got {type(cu).__name__}")
    return cu


def call_documents(rules: TokenRules, query: torch.Tensor, key: torch.Tensor,
                   kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cu_seqlens, cu_seqlens_k) over the batch flattened into one row, or None when the
    call holds no packed documents."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if rules.key_padding_mask is not None:
            raise ValueError("cu_seq_lens_q: packed documents take no padding mask; pass "
                             "attention_mask=None (each document ends where its offsets say)")
        cu_q = _offsets("cu_seq_lens_q", cu_q if cu_q is not None else cu_k)
        return cu_q, _offsets("cu_seq_lens_k", cu_k) if cu_k is not None else cu_q
    documents = rules.documents
    position_ids = kwargs.get("position_ids")
    if (documents is None and rules.key_padding_mask is None and rules.key_offset == 0
            and position_ids is not None and position_ids.dim() == 2
            and position_ids.shape[-1] == query.shape[2] == key.shape[2]):
        documents = find_packed_sequence_indices(position_ids.expand(query.shape[0], -1))
    if documents is None:
        return None
    cu = cu_seqlens_from_ids(documents.expand(query.shape[0], -1))
    return cu, cu


def packed_attention(query, key, value, pattern, rules: TokenRules, documents, scaling,
                     terms: dict):
    """The op over the batch's documents, with the call's score terms (`terms.model_terms`);
    returns transformers' [B, Nq, H, D]."""
    out = attention_over_rows(query, key, value, pattern, *documents, causal=rules.causal,
                              scale=scaling, window=rules.window, **terms)
    return out.transpose(1, 2).contiguous()
