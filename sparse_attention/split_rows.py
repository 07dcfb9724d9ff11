"""Split-KV decoding on the CUDA kernels: calls of few queries (decode steps, speculative
verification) make batch * heads * query blocks thread blocks, too few to fill a GPU over a
long cache, and each walks a long row of key blocks alone.

Here each row's key-block list is cut into pieces, every piece runs as a query head of its own
(q repeated along the heads, so the kernels' GQA maps the copies of a head to its kv head), and
the pieces' partial results merge by their log-sum-exp. The cut is the CPU kernels' own
(csrc/cpu/forward_kernel.h: a row of L blocks splits evenly into ceil(L / blocks of SPLIT_KEYS
keys) pieces, at most MAX_PIECES); it depends on the lists alone, never on the batch, so a row
gets the same bits in any batch. The backward runs the unsplit lists on the merged (out, lse),
which are the unsplit call's: the same gradients as without the split.

Opt-in until it has run on a GPU: CUDA calls split where CUDA_SPLIT_ENV is "1".
"""

from __future__ import annotations

import os

import torch

from sparse_attention import ops
from sparse_attention.layout import BlockLists
from sparse_attention.score_terms import NO_TERMS

CUDA_SPLIT_ENV = "SPARSE_ATTENTION_CUDA_SPLIT_KV"
SPLIT_QUERIES = 64  # calls of at most this many queries split their rows
SPLIT_KEYS = 1024  # keys per piece, about
MAX_PIECES = 16
MAX_PARTIAL_BYTES = 256 << 20  # the pieces' outputs of a call; past it the call runs unsplit
MAX_HEADS = 65535  # the CUDA kernels' grid takes at most this many heads (pieces included)


def _blocks_per_piece(block_size: int) -> int:
    return max(1, SPLIT_KEYS // block_size)


def enabled(device_type: str) -> bool:
    """Whether calls on this device type split rows here (the CPU kernels split their own)."""
    return device_type == "cuda" and os.environ.get(CUDA_SPLIT_ENV) == "1"


def num_slots(q: torch.Tensor, v: torch.Tensor, lists, block_size: int) -> int:
    """Pieces a row of this call may have (the copies of q's heads); 1 = no split. The longest
    row is at most the lists' key-block grid wide."""
    batch, heads, q_len, _ = q.shape
    if q_len > SPLIT_QUERIES or lists.row_indices.numel() == 0:
        return 1
    grid_blocks = lists.col_num_full.shape[-1]
    slots = min(MAX_PIECES, -(-grid_blocks // _blocks_per_piece(block_size)), MAX_HEADS // heads)
    partial_bytes = batch * heads * slots * q_len * (v.shape[-1] * v.element_size() + 4)
    return slots if slots > 1 and partial_bytes <= MAX_PARTIAL_BYTES else 1


def split_row_lists(lists, heads: int, slots: int, block_size: int) -> BlockLists:
    """Row lists over heads * slots layout heads (query head h's piece s at head h * slots + s)
    holding each row's pieces, in tensor ops of static shapes (no host sync). Only the rows are
    real: the forward op reads no column list, and these stand for their shape alone."""
    offsets = lists.row_offsets.long()
    num_full = lists.row_num_full.long()  # [list batch, layout heads, query blocks]
    list_batch, layout_heads, q_blocks = num_full.shape
    device = offsets.device
    # The original row of every (list batch, query head, query block), as [lb, H, 1, qb].
    layout_head = torch.arange(heads, device=device) * layout_heads // heads
    row = ((torch.arange(list_batch, device=device)[:, None] * layout_heads + layout_head)[..., None]
           * q_blocks + torch.arange(q_blocks, device=device))[:, :, None]
    start, length = offsets[row], offsets[row + 1] - offsets[row]
    per_piece = _blocks_per_piece(block_size)
    count = torch.clamp((length + per_piece - 1) // per_piece, 1, slots)
    piece = torch.arange(slots, device=device)[:, None]  # [S, 1], broadcast to [lb, H, S, qb]
    begin = torch.where(piece < count, piece * length // count, length)
    end = torch.where(piece < count, (piece + 1) * length // count, length)
    sizes = (end - begin).flatten()
    new_offsets = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
    # Entry e of the new lists: which new row holds it, and where it was.
    entries = torch.arange(lists.row_indices.numel() * (heads // layout_heads), device=device)
    new_row = torch.searchsorted(new_offsets[1:], entries, right=True).clamp_(max=sizes.numel() - 1)
    source = (start + begin).flatten()[new_row] + entries - new_offsets[new_row]
    indices = lists.row_indices[source.clamp_(0, lists.row_indices.numel() - 1)]
    # A row's full blocks come first, so a piece's are those before the row's count.
    full = torch.minimum(torch.clamp(num_full.flatten()[row] - begin, min=0), end - begin)
    int32 = torch.int32
    split_heads = (list_batch, heads * slots)
    shape_only = torch.zeros((), dtype=int32, device=device).expand(*split_heads,
                                                                     lists.col_num_full.shape[-1])
    return BlockLists(new_offsets.to(int32), indices, full.reshape(*split_heads, q_blocks).to(int32),
                      new_offsets.new_zeros(1, dtype=int32), lists.row_indices[:0], shape_only)


def merge_pieces(out: torch.Tensor, lse: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of whole rows from those of their pieces ([B, H * slots, ...]): each piece
    weighted by exp(its lse - the row's), in the lse's type; empty pieces weigh 0, and a row of
    none gets 0 and lse = -inf."""
    batch, split_heads, q_len, dim = out.shape
    pieces = out.view(batch, split_heads // slots, slots, q_len, dim)
    piece_lse = lse.view(batch, split_heads // slots, slots, q_len)
    row_lse = torch.logsumexp(piece_lse, dim=2)
    weight = torch.where(piece_lse == -torch.inf, 0.0, torch.exp(piece_lse - row_lse[:, :, None]))
    merged = (weight[..., None] * pieces.to(lse.dtype)).sum(dim=2)
    return merged.to(out.dtype), row_lse


class _SplitRowsForward(torch.autograd.Function):
    """The op's forward over pieces of rows; its backward is the unsplit op's."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_q, cu_k, *lists_and_call):
        *lists, slots, call = lists_and_call
        cu_seqlens = None if cu_q is None else (cu_q, cu_k)
        pieces = split_row_lists(BlockLists(*lists), q.shape[1], slots, call["block_size"])
        out, lse = ops.forward(q.repeat_interleave(slots, dim=1), k, v, pieces,
                               key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, **call)
        out, lse = merge_pieces(out, lse, slots)
        ctx.save_for_backward(q, k, v, key_padding_mask, cu_q, cu_k, out, lse, *lists)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_padding_mask, cu_q, cu_k, out, lse, *lists = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v, *_ = ops.backward(
            grad_out, grad_lse, q, k, v, out, lse, BlockLists(*lists),
            key_padding_mask=key_padding_mask, cu_seqlens=None if cu_q is None else (cu_q, cu_k),
            **ctx.call)
        return (grad_q, grad_k, grad_v) + (None,) * (3 + len(lists) + 2)


def forward(q, k, v, lists, *, key_padding_mask, block_size: int, scale: float, window,
            deterministic: bool = False, cu_seqlens=None, cuda_kernels: str = "auto",
            terms=NO_TERMS) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.forward's signature, with the rows of calls of few queries split (num_slots); the
    same as ops.forward where they do not split. Score terms are not taken here (on CUDA their
    calls run elsewhere)."""
    if terms.names():
        raise ValueError(f"{', '.join(terms.names())}: split rows take no score terms")
    lists = BlockLists(*lists)  # a plain tuple of the six from a compiled graph's constants
    call = dict(block_size=block_size, scale=scale, window=window, deterministic=deterministic,
                cuda_kernels=cuda_kernels)
    slots = num_slots(q, v, lists, block_size)
    if slots == 1:
        return ops.forward(q, k, v, lists, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                           **call)
    cu_q, cu_k = (None, None) if cu_seqlens is None else cu_seqlens
    return _SplitRowsForward.apply(q, k, v, key_padding_mask, cu_q, cu_k, *lists, slots, call)
