"""Global tokens (rows and/or columns) and seeded random blocks."""

from __future__ import annotations

import torch

from sparse_attention.patterns.arguments import check_bool, check_int, check_int_list
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid
from sparse_attention.patterns.sampling import random_blocks


class Global(Pattern):
    """Global tokens: as columns, every query sees them; as rows, they see every key (under
    causal, only keys not after them).

    Args:
        tokens: absolute token positions of the global tokens (e.g. [0] for a CLS token);
            every index must lie inside the sequence.
        num_blocks: or instead, the first num_blocks blocks are global (default 1 when tokens
            is not given); must not exceed the blocks of the sequence.
        rows: the global tokens attend to every key.
        columns: every query attends to the global tokens.
        block_size: tokens per block.
    """

    def __init__(self, *, tokens=None, num_blocks: int | None = None, rows: bool = True,
                 columns: bool = True, block_size: int = 64):
        super().__init__(block_size)
        if tokens is not None and num_blocks is not None:
            raise ValueError("tokens, num_blocks: give one of them, not both")
        self.tokens = None if tokens is None else check_int_list("tokens", tokens)
        self.num_blocks = None
        if tokens is None:
            self.num_blocks = check_int("num_blocks", 1 if num_blocks is None else num_blocks, minimum=1)
        self.rows, self.columns = check_bool("rows", rows), check_bool("columns", columns)
        if not (rows or columns):
            raise ValueError("rows, columns: at least one must be True")

    def _selected(self, positions: torch.Tensor, length: int, causal: bool) -> torch.Tensor:
        """Which of these absolute positions are global, after checking the indices fit. Under
        causal a sequence may be a prefix (a prompt, a decoding step): its global tokens
        beyond the end do not exist yet, and are no error."""
        if self.tokens is None:
            blocks = -(-length // self.block_size)
            if self.num_blocks > blocks and not causal:
                raise ValueError(
                    f"num_blocks: {self.num_blocks} global blocks but the sequence of {length} "
                    f"tokens has only {blocks} blocks of {self.block_size}"
                )
            return (positions >= 0) & (positions < self.num_blocks * self.block_size)
        if max(self.tokens) >= length and not causal:
            raise ValueError(f"tokens: index {max(self.tokens)} is outside the {length} tokens")
        return torch.isin(positions, torch.tensor(self.tokens))

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        mask = torch.zeros(grid.shape, dtype=torch.bool)
        if self.columns:
            mask |= grid.key_set(self._selected(grid.key_positions(), grid.seq_len, causal), causal)
        if self.rows:
            mask |= grid.query_set(self._selected(grid.query_positions(), grid.seq_len, causal), causal)
        return mask

    def _describe(self) -> str:
        which = f"tokens={list(self.tokens)}" if self.tokens is not None else f"num_blocks={self.num_blocks}"
        return f"{which}, rows={self.rows}, columns={self.columns}, block_size={self.block_size}"


class Random(Pattern):
    """Random key blocks: every query-block row gets num_blocks distinct key blocks, chosen by
    a seeded hash of (seed, head, row, key block). The same seed gives the same blocks on every
    process; under causal only blocks that are not wholly in the future are drawn. Rows are
    indexed bottom-right aligned (query block r of Nq against kb key blocks is row
    r + kb - qb), so decoding sees the blocks its row had in the full sequence.

    Args:
        num_blocks: random key blocks per row (rows with fewer candidates take them all).
        seed: an int >= 0.
        per_head: draw different blocks for every head.
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, *, seed: int = 0, per_head: bool = False,
                 block_size: int = 64):
        super().__init__(block_size)
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=0)
        self.seed = check_int("seed", seed)
        self.per_head = check_bool("per_head", per_head)

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        heads = torch.arange(num_heads if self.per_head else 1).view(-1, 1, 1)
        allowed = grid.visible() if causal else torch.ones(grid.shape, dtype=torch.bool)
        return random_blocks(self.seed, heads, grid.rows, grid.cols, allowed, self.num_blocks)

    def _describe(self) -> str:
        return (f"num_blocks={self.num_blocks}, seed={self.seed}, per_head={self.per_head}, "
                f"block_size={self.block_size}")
