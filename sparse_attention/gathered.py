"""Block-sparse attention in plain torch ops, over the kernels' block lists.

What runs a CUDA call the CUDA kernels are not compiled for (float32 and float64 inputs,
block sizes 16 and 32, head dims above 128, GPUs older than sm_80): each query block's listed
key blocks are gathered, their scores computed by batched matmuls (cuBLAS: TF32 tensor cores
for float32 where torch.backends.cuda.matmul.allow_tf32 allows, else exact; float64 on CUDA
cores), masked by the element rules, and softmaxed. The work and the memory follow the
computed blocks, not N^2: query blocks are taken in chunks of rows of similar length, and
under autograd each chunk is recomputed in the backward instead of kept (activation
checkpointing). Differentiable by autograd; slower than the kernels; the backward adds the
keys' gradients with index_add (atomics on CUDA: not bit-identical run to run).

Same contract as the op (sparse_attention.ops.forward): out in q's dtype, lse in
ops.lse_dtype, a query that sees no key gets 0 and lse = -inf.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from sparse_attention import score_terms
from sparse_attention.ops import lse_dtype
from sparse_attention.score_terms import NO_TERMS, Terms
from sparse_attention.window import Window

# Elements of the gathered keys, values and scores one chunk of rows may hold at once.
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 and bf16 are computed in fp32, as the kernels accumulate them; fp32 and fp64 as is."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def forward(q, k, v, lists, *, key_padding_mask, block_size: int, scale: float,
            window: Window = Window(), terms: Terms = NO_TERMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the op over the block lists (a BlockLists): rows only (the column lists
    serve the kernels' backward; autograd needs none). terms: the score terms, applied as the
    kernels and the reference apply them (dropout from the same Philox bits, keyed by the
    tensors' rows)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    bs = block_size
    row_offsets, row_indices = lists[0].long(), lists[1].long()
    list_batch, layout_heads, q_blocks = lists[2].shape
    # Row r of the call is (batch entry, query head, query block) in that order; its list is
    # block_rules.h's list_index.
    all_rows = batch * heads * q_blocks
    row = torch.arange(all_rows, device=q.device)
    row_qb, row_head, row_batch = row % q_blocks, row // q_blocks % heads, row // (q_blocks * heads)
    row_kv = row_batch * kv_heads + row_head // (heads // kv_heads)
    list_of_row = (((row_batch if list_batch > 1 else 0) * layout_heads
                    + row_head // (heads // layout_heads)) * q_blocks + row_qb)
    starts = row_offsets[list_of_row]
    row_counts = row_offsets[list_of_row + 1] - starts
    counts = row_counts.cpu()

    cdtype = compute_dtype(q.dtype)
    q_rows = torch.nn.functional.pad(q, (0, 0, 0, q_blocks * bs - q_len)).reshape(-1, bs, head_dim)
    k_flat = k.reshape(-1, head_dim)
    v_flat = v.reshape(-1, value_dim)
    buckets = None
    if terms.position_bias is not None:
        buckets = score_terms.distance_buckets(terms.position_bias, q_len, k_len).to(q.device).long()
    left, right = window
    pads = None if key_padding_mask is None else key_padding_mask.to(q.device)

    def chunk(rows, num_blocks, q_part, k_all, v_all):
        # Key tokens of each row: its listed blocks, in num_blocks slots (those past the
        # row's count are masked).
        slot = torch.arange(num_blocks, device=q.device)
        listed = slot < row_counts[rows].unsqueeze(1)
        blocks = row_indices[(starts[rows].unsqueeze(1) + slot).clamp(max=max(row_indices.numel() - 1, 0))]
        keys = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).flatten(1)
        seen = listed.repeat_interleave(bs, dim=1) & (keys < k_len)
        keys = keys.clamp(max=k_len - 1)
        flat = row_kv[rows].unsqueeze(1) * k_len + keys
        if pads is not None:
            seen = seen & ~pads[row_batch[rows].unsqueeze(1), keys]
        queries = row_qb[rows].view(-1, 1) * bs + torch.arange(bs, device=q.device)
        dist = keys.unsqueeze(1) - queries.unsqueeze(2) - (k_len - q_len)
        visible = seen.unsqueeze(1) & (queries < q_len).unsqueeze(2)
        if left is not None:
            visible = visible & (dist >= -left)
        if right is not None:
            visible = visible & (dist <= right)
        kg = k_all.index_select(0, flat.reshape(-1)).view(*flat.shape, -1).to(cdtype)
        vg = v_all.index_select(0, flat.reshape(-1)).view(*flat.shape, -1).to(cdtype)
        scores = _with_terms((q_part.to(cdtype) @ kg.transpose(1, 2)) * scale, terms, dist,
                             row_batch[rows], row_head[rows], buckets, k_len)
        scores = scores.masked_fill(~visible, float("-inf"))
        # The softmax by hand: a row that sees no key must give 0 and lse = -inf (the sink,
        # with sinks) with finite gradients, where logsumexp's backward would give NaN. The
        # shift m cancels exactly, so it carries no gradient.
        m = scores.detach().amax(dim=-1, keepdim=True)
        sink = None
        if terms.sinks is not None:
            sink = terms.sinks.to(cdtype)[row_head[rows]].view(-1, 1, 1)
            m = torch.maximum(m, sink.detach())
        m = torch.where(torch.isfinite(m), m, 0)
        p = torch.exp(scores - m)
        total = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            total = total + torch.exp(sink - m)
        seen_any = total > 0
        total = torch.where(seen_any, total, 1)
        lse = torch.where(seen_any, m + torch.log(total), float("-inf")).squeeze(-1)
        p = p / total
        if terms.dropout_p > 0:
            keep = score_terms.dropout_keep_at(terms.seed, terms.dropout_p,
                                               row_batch[rows].view(-1, 1, 1),
                                               row_head[rows].view(-1, 1, 1),
                                               queries.unsqueeze(2), keys.unsqueeze(1))
            p = p * keep / (1 - terms.dropout_p)
        return p @ vg, lse.to(lse_dtype(q.dtype))

    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    per_row = bs * max(head_dim, value_dim, bs) * 3
    start, parts = 0, []
    while start < len(sorted_counts) and sorted_counts[start] > 0:
        num_blocks = sorted_counts[start]
        take = max(1, CHUNK_ELEMENTS // (per_row * num_blocks))
        end = min(start + take, len(sorted_counts))
        while sorted_counts[end - 1] == 0:
            end -= 1
        rows = order[start:end].to(q.device)
        args = (rows, num_blocks, q_rows[rows], k_flat, v_flat)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out_part, lse_part = checkpoint(chunk, *args, use_reentrant=False)
        else:
            out_part, lse_part = chunk(*args)
        parts.append((rows, out_part, lse_part))
        start = end
    out_rows = torch.zeros(all_rows, bs, value_dim, dtype=cdtype, device=q.device)
    if terms.sinks is None:
        lse_rows = torch.full((all_rows, bs), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    else:  # a row without keys: its denominator is the sink alone
        lse_rows = terms.sinks.to(lse_dtype(q.dtype))[row_head].unsqueeze(1).expand(-1, bs)
    if parts:
        rows = torch.cat([r for r, _, _ in parts])
        out_rows = out_rows.index_put((rows,), torch.cat([o for _, o, _ in parts]))
        lse_rows = lse_rows.index_put((rows,), torch.cat([l for _, _, l in parts]))
    out = out_rows.view(batch, heads, q_blocks * bs, value_dim)[:, :, :q_len].to(q.dtype)
    lse = lse_rows.view(batch, heads, q_blocks * bs)[:, :, :q_len]
    return out, lse


def _with_terms(scores, terms: Terms, dist, batch, head, buckets, k_len: int):
    """Scores [rows, queries, keys] soft-capped, plus the ALiBi and position biases of the
    distances `dist` (as reference._with_terms, on gathered rows of batch entries `batch` and
    heads `head`)."""
    if terms.softcap > 0:
        scores = terms.softcap * torch.tanh(scores / terms.softcap)
    if terms.alibi_slopes is not None:
        slopes = terms.alibi_slopes.to(scores.dtype)
        slopes = slopes[head] if slopes.dim() == 1 else slopes[batch, head]
        scores = scores - slopes.view(-1, 1, 1) * dist.abs().to(scores.dtype)
    if buckets is not None:
        # buckets[d + k_len - 1] is distance d's; the queries past the end (masked anyway)
        # are clamped into range.
        bucket = buckets[(dist + k_len - 1).clamp(0, buckets.numel() - 1)]
        table = terms.position_bias.table.to(scores.dtype)
        scores = scores + table[head.view(-1, 1, 1), bucket]
    return scores
