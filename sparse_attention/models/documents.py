"""Packed documents in a model's input: the op's offsets and every token's position in its
own document, worked out once per forward pass for all layers."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparse_attention.documents import positions_in_documents
from sparse_attention.packing import check_cu_seqlens, document_lengths


class Documents(NamedTuple):
    """cu_seqlens: int32/int64 [documents + 1] over the batch's B * N tokens taken row after
    row; positions: int64 [B, N], each token's position from its document's start."""

    cu_seqlens: torch.Tensor
    positions: torch.Tensor


def documents_of(cu_seqlens: torch.Tensor, input_ids: torch.Tensor, max_seq_len: int) -> Documents:
    """The Documents of input_ids [B, N]; ValueError naming cu_seqlens when it does not fit
    them or a document is longer than max_seq_len (the positions a model has)."""
    batch, n = input_ids.shape
    check_cu_seqlens("cu_seqlens", cu_seqlens, batch * n, input_ids.device)
    if not torch.compiler.is_compiling():
        longest = max(document_lengths(cu_seqlens))
        if longest > max_seq_len:
            raise ValueError(f"cu_seqlens: a document of {longest} tokens exceeds "
                             f"max_seq_len={max_seq_len}")
    positions = positions_in_documents(cu_seqlens.to(input_ids.device), batch * n)
    return Documents(cu_seqlens, positions.view(batch, n))


def document_starts(cu_seqlens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bool like like's [B, N]: True at every document's first token (labels there are not
    predicted from the document before)."""
    total = like.numel()
    starts = torch.zeros(total + 1, dtype=torch.bool, device=like.device)
    starts = starts.index_fill(0, cu_seqlens.to(like.device, torch.int64), True)
    return starts[:total].view(like.shape)


def pool_documents(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str) -> torch.Tensor:
    """[documents, d] from hidden [T, d]: every document's first token ("first") or the mean
    of its tokens ("mean"); an empty document pools to zeros."""
    cu = cu_seqlens.to(hidden.device, torch.int64)
    lengths = cu.diff()
    if pooling == "first":
        first = hidden[cu[:-1].clamp(max=hidden.shape[0] - 1)]
        return first * (lengths > 0).unsqueeze(-1).to(hidden.dtype)
    document = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device),
                                       lengths, output_size=hidden.shape[0])
    sums = hidden.new_zeros(lengths.shape[0], hidden.shape[1]).index_add(0, document, hidden)
    return sums / lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
