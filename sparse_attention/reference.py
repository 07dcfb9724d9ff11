"""Dense reference implementation of the op's contract, for tests and for debugging.

It expands the layout and the element rules into a full [Nq, Nk] mask and runs plain
attention in `compute_dtype` (fp64 by default), with every score term
(sparse_attention.score_terms) computed densely and dropout's mask rebuilt from its seed.
O(N^2) time and memory: use on small inputs.
The mask itself is `element_mask` (from sparse_attention/element_rules.py, re-exported here).
"""

from __future__ import annotations

import math

import torch

from sparse_attention import score_terms
from sparse_attention.element_rules import element_mask
from sparse_attention.layout import BlockLayout
from sparse_attention.tensor_layout import TensorLayout
from sparse_attention.memory import check_fits_in_memory

__all__ = ["attention", "element_mask"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | TensorLayout,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    position_bias=None,
    dropout_p: float = 0.0,
    seed=None,
    terms: score_terms.Terms | None = None,
    rows: tuple[int, int] = (0, 0),
):
    """Same contract as sparse_attention.sparse_attention, computed densely.

    Differentiable: use it for reference gradients (the score terms' too). Output has q's
    dtype; lse is in compute_dtype. With cu_seqlens (packed documents) every document is
    computed alone, with `layout` a pattern (its layout and rules per document) or a
    TensorLayout (one grid per document or one shared, its top-left corner used).
    terms: checked score terms (sparse_attention.score_terms.resolve) instead of the separate
    arguments; rows: the first query and key rows of q and k in the call's tensors, which key
    dropout's bits (packed documents)."""
    if terms is None:
        terms = score_terms.resolve(q, sinks=sinks, alibi_slopes=alibi_slopes, softcap=softcap,
                                    position_bias=position_bias, dropout_p=dropout_p, seed=seed,
                                    causal=causal)
    if cu_seqlens is not None:
        return _packed(q, k, v, layout, cu_seqlens, cu_seqlens_k, causal=causal, scale=scale,
                       window=window, return_lse=return_lse, compute_dtype=compute_dtype,
                       terms=terms)
    heads, kv_heads = q.shape[1], k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Scores, their masked copies and the probabilities: [B, H, Nq, Nk] each.
    scores_bytes = q.shape[0] * heads * q_len * k_len * torch.empty((), dtype=compute_dtype).element_size()
    check_fits_in_memory("reference.attention", 3 * scores_bytes)
    mask = element_mask(
        layout, q_len, k_len, causal=causal, window=window, key_padding_mask=key_padding_mask,
        device=q.device,
    )
    if mask.shape[1] not in (1, heads):  # one layout per kv head, shared by its GQA group
        mask = mask.repeat_interleave(heads // mask.shape[1], dim=1)
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(heads // kv_heads, dim=1)
    vc = vc.repeat_interleave(heads // kv_heads, dim=1)
    scores = _with_terms((qc @ kc.transpose(-1, -2)) * scale, terms, compute_dtype)
    # Rows that see no key get probabilities 0 (so output 0) and lse = -inf (the sink with
    # sinks); their scores are replaced by zeros first so that no -inf - -inf reaches the
    # gradient.
    seen = mask.any(dim=-1, keepdim=True)
    scores = torch.where(mask, scores, float("-inf"))
    scores = torch.where(seen, scores, 0.0)
    if terms.sinks is not None:
        sink = terms.sinks.to(compute_dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        lse = torch.logsumexp(torch.cat([torch.where(seen, scores, float("-inf")), sink], dim=-1),
                              dim=-1, keepdim=True)
        probs = torch.where(seen, torch.exp(scores - lse), 0.0)
        lse = lse.squeeze(-1)
    else:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.where(seen, torch.exp(scores - lse), 0.0)
        lse = torch.where(seen, lse, float("-inf")).squeeze(-1).expand(q.shape[:3])
    if terms.dropout_p > 0:
        keep = score_terms.dropout_keep(terms.seed, terms.dropout_p, q.shape[0], heads,
                                        torch.arange(q_len) + rows[0], torch.arange(k_len) + rows[1])
        probs = probs * keep.to(q.device) / (1 - terms.dropout_p)
    out = (probs @ vc).to(q.dtype)
    return (out, lse) if return_lse else out


def _with_terms(scores: torch.Tensor, terms: score_terms.Terms, dtype: torch.dtype) -> torch.Tensor:
    """Scores [B, H, Nq, Nk] soft-capped, plus the ALiBi and position biases of distance
    d = key - query - (Nk - Nq)."""
    if terms.softcap > 0:
        scores = terms.softcap * torch.tanh(scores / terms.softcap)
    q_len, k_len = scores.shape[-2:]
    d = (torch.arange(k_len).view(1, -1) - torch.arange(q_len).view(-1, 1) - (k_len - q_len)).to(scores.device)
    if terms.alibi_slopes is not None:
        slopes = terms.alibi_slopes.to(dtype)
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        scores = scores - slopes * d.abs().to(dtype)
    if terms.position_bias is not None:
        bias = terms.position_bias
        buckets = score_terms.distance_buckets(bias, q_len, k_len).to(scores.device)[d + k_len - 1]
        scores = scores + bias.table.to(dtype)[:, buckets.long()]
    return scores


def _packed(q, k, v, layout, cu_q, cu_k, *, return_lse, causal, scale, window, **rest):
    from sparse_attention.attention import call_rules  # attention imports this module's users
    from sparse_attention.packing import document_mask, rows_without_keys
    from sparse_attention.patterns.base import Pattern

    cu_k = cu_q if cu_k is None else cu_k
    outs, lses = [], []
    q_starts, k_starts = cu_q.tolist(), cu_k.tolist()
    sinks = rest["terms"].sinks
    for d, (q0, q1, k0, k1) in enumerate(zip(q_starts, q_starts[1:], k_starts, k_starts[1:])):
        if k1 == k0 or q1 == q0:
            out, lse = rows_without_keys(q, q1 - q0, v.shape[3], rest["compute_dtype"], sinks)
            outs.append(out)
            lses.append(lse)
            continue
        doc_scale, doc_causal, doc_window = call_rules(layout, q.shape[-1], causal=causal,
                                                       scale=scale, window=window)
        if isinstance(layout, Pattern):
            doc_layout = layout.layout(q1 - q0, k1 - k0, num_heads=q.shape[1], causal=doc_causal)
        else:
            doc_layout = TensorLayout(document_mask(layout.mask, d, q1 - q0, k1 - k0,
                                                    layout.block_size)[None], layout.block_size)
        out, lse = attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], doc_layout,
                             causal=doc_causal, scale=doc_scale, window=tuple(doc_window),
                             return_lse=True, rows=(q0, k0), **rest)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out
