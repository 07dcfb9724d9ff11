"""Documents packed in rows, in the op's terms: cu_seqlens from per-token document ids or from
document starts, every token's position inside its document (positions restart per document,
as if each document were run alone), and the op over the documents of a batch's rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_attention.attention import sparse_attention


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32 [documents + 1]) of one row from a bool [T] that is True at every
    document's first token (the row's first token always starts one).

    Eagerly one entry per document. Under torch.compile the shape may not follow the
    values (no recompile, no graph break when the documents change): T + 1 entries, the
    documents after the last one empty, which the op allows."""
    if starts.dim() != 1 or starts.dtype != torch.bool:
        raise ValueError(f"starts: expected a 1-d bool tensor, got {starts.dtype} of shape "
                         f"{tuple(starts.shape)}")
    total = starts.shape[0]
    starts = starts.clone()
    starts[:1] = True
    if torch.compiler.is_compiling():
        document = starts.cumsum(0) - 1
        counts = torch.zeros(total, dtype=torch.int64, device=starts.device)
        counts.scatter_add_(0, document, torch.ones_like(document))
        return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    first = starts.nonzero().flatten()
    end = torch.tensor([total], device=starts.device)
    return torch.cat([first, end]).to(torch.int32)


def cu_seqlens_from_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of rows [B, T] of per-token document ids (a new id starts a new document,
    as transformers' packed sequence masks number them), the rows taken one after another as
    one row of B * T tokens: every row starts a document of its own."""
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids: expected [batch, seq_len], got shape "
                         f"{tuple(document_ids.shape)}")
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return cu_seqlens_from_starts(starts.flatten())


def positions_in_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: every token's position from the start of its document."""
    cu = cu_seqlens.to(torch.int64)
    document_start = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=total)
    return torch.arange(total, device=cu.device) - document_start


def one_row(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] as the op's packed row [1, H, B * N, D] (a view when B is 1)."""
    return t.transpose(0, 1).reshape(1, t.shape[1], -1, t.shape[3])


def attention_over_rows(q, k, v, layout, cu_seqlens, cu_seqlens_k=None, **op_arguments):
    """sparse_attention over documents packed in the rows of a batch: q [B, H, Nq, D], k, v
    [B, Hkv, Nk, D], cu_seqlens over the B * Nq tokens taken row after row (FlashAttention's
    varlen over a flattened batch; a document may not start in one row and end in the next
    unless the rows are one sequence). Returns [B, H, Nq, Dv]."""
    batch, heads, q_len, _ = q.shape
    out = sparse_attention(one_row(q), one_row(k), one_row(v), layout, cu_seqlens=cu_seqlens,
                           cu_seqlens_k=cu_seqlens_k, **op_arguments)
    return out[0].view(heads, batch, q_len, v.shape[3]).transpose(0, 1)
