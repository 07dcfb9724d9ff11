"""Patterns around the diagonal: dense, local (sliding window) and dilated windows."""

from __future__ import annotations

import torch

from sparse_attention.patterns.arguments import check_bool, check_int, check_multiple_of_block
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


class Dense(Pattern):
    """Every block (under causal, every block not wholly in the future).

    Args:
        block_size: tokens per block.
    """

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        return torch.ones(grid.shape, dtype=torch.bool)


class Local(Pattern):
    """Sliding window: query p sees the keys j with |p - j| < window (j <= p under causal,
    two-sided otherwise).

    Args:
        window: tokens on each side, counting the query's own position (window=1 is the
            diagonal only). A window of w * block_size covers w blocks on each side of the
            diagonal block.
        block_size: tokens per block.
        exact: also apply the window token by token inside the blocks (sparse_attention's
            `window=(window - 1, window - 1)`), so that attention is exactly this window
            instead of its block cover.
    """

    def __init__(self, window: int, *, block_size: int = 64, exact: bool = False):
        super().__init__(block_size)
        self.window = check_int("window", window, minimum=1)
        self.exact = check_bool("exact", exact)
        if exact:
            self.token_window = (window - 1, window - 1)

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        return grid.band(-(self.window - 1), self.window - 1, causal)

    def _describe(self) -> str:
        exact = ", exact=True" if self.exact else ""
        return f"window={self.window}, block_size={self.block_size}{exact}"


class Dilated(Pattern):
    """Dilated window: query p sees the keys j with p - j a multiple of `dilation` and
    |p - j| < window (j <= p under causal). At block granularity: every (dilation /
    block_size)-th block along the diagonal.

    Args:
        dilation: tokens between attended positions, a multiple of block_size.
        window: tokens on each side (None: the whole sequence, which is the strided part of
            the Sparse Transformer's strided pattern).
        block_size: tokens per block.
    """

    def __init__(self, dilation: int, *, window: int | None = None, block_size: int = 64):
        super().__init__(block_size)
        self.dilation = check_multiple_of_block("dilation", dilation, self.block_size)
        self.window = None if window is None else check_int("window", window, minimum=1)

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        reach = None if self.window is None else self.window - 1
        return grid.multiples(self.dilation, None if reach is None else -reach, reach, causal)

    def _describe(self) -> str:
        return f"dilation={self.dilation}, window={self.window}, block_size={self.block_size}"
