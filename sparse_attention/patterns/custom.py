"""Custom patterns from a user block mask or a function of (head, query block, key block)."""

from __future__ import annotations

import itertools

import torch

from sparse_attention.layout import BlockLayout
from sparse_attention.patterns.arguments import check_bool, renamed
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


class Custom(Pattern):
    """A pattern given block by block.

    Query blocks are indexed bottom-right aligned: query block r of a call with qb query
    blocks and kb key blocks is row r + kb - qb, so for self-attention it is r, and the one
    query block of a decoding step is the last row.

    Args:
        mask_or_fn: either
            - a bool block mask [heads, rows, cols] or [rows, cols] (heads 1: shared; else one
              layout per head, and calls must use that many heads). It must be the call's block
              grid, or a square grid of a longer sequence, of which a call with qb query and kb
              key blocks uses rows kb - qb .. kb - 1 and columns 0 .. kb - 1;
            - or a function fn(head, q_block, k_block) -> bool. It is first called once with
              int64 tensors head [H, 1, 1], q_block [1, qb, 1], k_block [1, 1, kb] and may
              return a bool tensor broadcastable to [H, qb, kb] (e.g.
              `lambda h, q, k: (q - k).abs() <= 1`); if that fails or gives no tensor, it is
              called once per block with ints (slow: for small grids).
        per_head: for a function, call it for every head (head is always 0 otherwise).
        block_size: tokens per block.
    """

    def __init__(self, mask_or_fn, *, per_head: bool = False, block_size: int = 64):
        super().__init__(block_size)
        self.fn = self.mask = None
        if isinstance(mask_or_fn, torch.Tensor):
            try:  # BlockLayout checks and copies the mask
                self.mask = BlockLayout(mask_or_fn, self.block_size).mask
            except (TypeError, ValueError) as error:
                raise renamed(error, "mask", "mask_or_fn") from None
            self.per_head = self.mask.shape[0] > 1
        elif callable(mask_or_fn):
            self.fn = mask_or_fn
            self.per_head = check_bool("per_head", per_head)
        else:
            raise TypeError(
                f"mask_or_fn: expected a bool tensor or a callable, got {type(mask_or_fn).__name__}"
            )

    def check_num_heads(self, num_heads: int) -> None:
        if self.mask is not None and self.per_head and num_heads != self.mask.shape[0]:
            raise ValueError(
                f"num_heads: the mask has {self.mask.shape[0]} heads, got {num_heads}"
            )

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        if self.mask is not None:
            return self._from_mask(grid)
        heads = num_heads if self.per_head else 1
        return self._from_fn(heads, grid.rows.squeeze(1), grid.cols.squeeze(0))

    def _from_mask(self, grid: Grid) -> torch.Tensor:
        rows, cols = self.mask.shape[1:]
        if (rows, cols) == grid.shape:
            return self.mask
        first_row = grid.k_blocks - grid.q_blocks
        if rows == cols and cols >= grid.k_blocks and first_row >= 0:
            return self.mask[:, first_row:grid.k_blocks, :grid.k_blocks]
        raise ValueError(
            f"mask_or_fn: a {rows} x {cols} block mask does not fit Nq={grid.q_len}, "
            f"Nk={grid.k_len} (a {grid.q_blocks} x {grid.k_blocks} grid of blocks of "
            f"{grid.block_size}), nor is it a larger square grid"
        )

    def _from_fn(self, heads: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        shape = (heads, len(rows), len(cols))
        try:
            out = self.fn(torch.arange(heads).view(-1, 1, 1), rows.view(1, -1, 1), cols.view(1, 1, -1))
            if isinstance(out, torch.Tensor):
                return torch.broadcast_to(out.to(torch.bool), shape).clone()
        except (TypeError, RuntimeError, ValueError, IndexError):
            pass  # not vectorisable: evaluate block by block below
        values = [bool(self.fn(h, int(r), int(c)))
                  for h, r, c in itertools.product(range(heads), rows.tolist(), cols.tolist())]
        return torch.tensor(values, dtype=torch.bool).view(shape)

    def _describe(self) -> str:
        what = f"mask of shape {tuple(self.mask.shape)}" if self.mask is not None else repr(self.fn)
        return f"{what}, block_size={self.block_size}"
