"""FlexAttention for the benchmarks: the BlockMask equivalent to one of our layouts, built from
our block lists in O(blocks) (create_block_mask would evaluate the mask on all N^2 elements),
and the compiled flex_attention."""

from __future__ import annotations

import functools

import torch

import sparse_attention as sa


def _padded(lists_offsets, indices, first, count, rows: int, width: int) -> torch.Tensor:
    """Per row, entries [first, first + count) of its CSR list, left-aligned in a [rows, width]
    int32 tensor (the unused tail is 0, as Flex expects)."""
    out = torch.zeros(rows, width, dtype=torch.int32, device=indices.device)
    row_of = torch.repeat_interleave(torch.arange(rows, device=indices.device), count)
    slot = torch.arange(row_of.numel(), device=indices.device) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count)
    source = torch.repeat_interleave(lists_offsets[:-1].long() + first, count) + slot
    out[row_of, slot] = indices[source]
    return out


def flex_block_mask(layout: sa.BlockLayout, q_len: int, k_len: int, causal: bool, device):
    """BlockMask for Flex with the same computed blocks, full/partial split and element rule
    (bottom-right causal) as our op."""
    from torch.nn.attention.flex_attention import BlockMask

    window = (None, 0) if causal else None
    lists = layout.block_lists(q_len, k_len, window, torch.device(device))
    heads, q_blocks, k_blocks = layout.shape
    rows = heads * q_blocks
    offsets = lists.row_offsets.long()
    total = offsets[1:] - offsets[:-1]
    full = lists.row_num_full.long().flatten()
    full_idx = _padded(offsets, lists.row_indices, torch.zeros_like(full), full, rows, k_blocks)
    part_idx = _padded(offsets, lists.row_indices, full, total - full, rows, k_blocks)
    shift, bs = k_len - q_len, layout.block_size
    blocks = layout.mask.to(device)
    shared = blocks[0]  # an int index next to tensor ones fails in torch 2.10's eager Flex

    # Exact element rule (block lookup and causal), as a user of create_block_mask would
    # write it: compiled Flex evaluates it on partial blocks only, eager Flex everywhere.
    def mask_mod(b, h, q_idx, kv_idx):
        if heads > 1:
            listed = blocks[h, q_idx // bs, kv_idx // bs]
        else:
            listed = shared[q_idx // bs, kv_idx // bs]
        return listed & (q_idx + shift >= kv_idx) if causal else listed

    def shaped(t):
        return t.reshape(1, heads, q_blocks, *t.shape[1:]).contiguous()

    return BlockMask.from_kv_blocks(
        shaped((total - full).int()), shaped(part_idx), shaped(full.int()), shaped(full_idx),
        BLOCK_SIZE=bs, mask_mod=mask_mod,
        seq_lengths=(q_len, k_len))


@functools.cache
def compiled_flex():
    """torch.compile(flex_attention, dynamic=False), allowed one graph per shape of a large
    grid: past dynamo's default of 8 shapes it would fall back to Flex's unfused eager code."""
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
    return torch.compile(flex_attention, dynamic=False)
