"""FullSequenceRows: a pattern whose calls get their rows of the whole sequence's layout."""

from __future__ import annotations

import torch

from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


class FullSequenceRows(Pattern):
    """`pattern`, with each query block of a call given its row of the whole sequence's layout
    (the Nk positions of the keys), also for bidirectional attention.

    Causal layouts already take their rows from the whole-sequence blocks (see
    `sparse_attention.patterns.grid`), and `sparse_attention` splits a causal chunk that
    starts inside a block, so causal callers need no wrapper. Bidirectionally, a call of Nq
    queries after Nk - Nq earlier tokens would otherwise get the smallest cover of its own
    queries. Each query block of the call must lie inside one block of the sequence: Nk - Nq a
    multiple of block_size, or all Nq queries in the block of the first.
    """

    def __init__(self, pattern: Pattern):
        super().__init__(pattern.block_size)
        self.pattern = pattern
        self.per_head = pattern.per_head
        self.token_window = pattern.token_window
        self.causal = pattern.causal

    def check_num_heads(self, num_heads: int) -> None:
        self.pattern.check_num_heads(num_heads)

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        bs = self.block_size
        if grid.offset % bs and grid.q_len > bs - grid.offset % bs:
            raise ValueError(
                f"q_len: {grid.q_len} queries after {grid.offset} tokens span two blocks of "
                f"{bs}; split them at the block boundary"
            )
        whole = self.pattern.block_mask(Grid(grid.k_len, grid.k_len, bs), num_heads, causal)
        first = grid.offset // bs
        return whole[..., first:first + grid.q_blocks, :]

    def _describe(self) -> str:
        return repr(self.pattern)
