"""The Sparse Transformer's strided and fixed patterns (Child et al. 2019), and stride_for."""

from __future__ import annotations

import math

import torch

from sparse_attention.layout import num_blocks
from sparse_attention.patterns.arguments import (
    check_block_size, check_bool, check_int, check_multiple_of_block,
)
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


def stride_for(seq_len: int, block_size: int = 64) -> int:
    """Stride (strided) or chunk length (fixed) for seq_len tokens: round(sqrt(number of
    blocks)) blocks, at least one, i.e. the multiple of block_size nearest sqrt(seq_len *
    block_size).

    Measured in blocks this is sqrt(N / block_size): it balances the stride's local blocks
    per row (l / block_size) against its strided columns (N / l), so each query block computes
    about 2 * sqrt(N / block_size) blocks and the whole layout grows as N^1.5. (A token stride
    of sqrt(N) would leave one or two blocks between strided columns at everyday lengths,
    which is dense in block terms.)"""
    check_int("seq_len", seq_len, minimum=1)
    check_block_size(block_size)
    return block_size * max(1, round(math.sqrt(num_blocks(seq_len, block_size))))


class Strided(Pattern):
    """Sparse Transformer strided pattern with stride l: query p sees
    A1 = {j : |p - j| < l} (the l previous positions under causal) and
    A2 = {j : (p - j) mod l == 0}, at block granularity.

    Args:
        stride: l in tokens, a multiple of block_size (see `stride_for`).
        block_size: tokens per block.
        factorized: give A1 to even heads and A2 to odd heads (the paper's factorised heads)
            instead of their union to every head; needs an even number of heads.
    """

    def __init__(self, stride: int, *, block_size: int = 64, factorized: bool = False):
        super().__init__(block_size)
        self.stride = check_multiple_of_block("stride", stride, self.block_size)
        self.factorized = check_bool("factorized", factorized)
        self.per_head = factorized

    def check_num_heads(self, num_heads: int) -> None:
        if self.factorized and num_heads % 2:
            raise ValueError(
                f"num_heads: a factorized strided pattern alternates two head layouts and "
                f"needs an even number of heads, got {num_heads}"
            )

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        local = grid.band(-(self.stride - 1), self.stride - 1, causal)
        strided = grid.multiples(self.stride, None, None, causal)
        if not self.factorized:
            return local | strided
        return torch.stack([local, strided]).repeat(num_heads // 2, 1, 1)

    def _describe(self) -> str:
        factorized = ", factorized=True" if self.factorized else ""
        return f"stride={self.stride}, block_size={self.block_size}{factorized}"


class Fixed(Pattern):
    """Sparse Transformer fixed pattern with chunk length l and c summary positions: query p
    sees A1 = {j : floor(j / l) == floor(p / l)} (its chunk; under causal only j <= p) and
    A2 = {j : j mod l in [l - c, l)} (the last c positions of every chunk), at block
    granularity.

    Args:
        chunk: l in tokens, a multiple of block_size (see `stride_for`).
        summary: c in tokens, 1 to chunk (default block_size). A c below block_size still
            computes the whole block holding those positions.
        num_patterns: number of different summary sub-blocks: head h uses the positions
            [l - (k + 1) c, l - k c) of every chunk with k = h mod num_patterns (the paper's
            per-head variation). num_patterns * summary must not exceed chunk, and the number
            of heads must be a multiple of num_patterns.
        block_size: tokens per block.
    """

    def __init__(self, chunk: int, *, summary: int | None = None, num_patterns: int = 1,
                 block_size: int = 64):
        super().__init__(block_size)
        self.chunk = check_multiple_of_block("chunk", chunk, self.block_size)
        self.summary = self.block_size if summary is None else check_int("summary", summary, minimum=1)
        if self.summary > self.chunk:
            raise ValueError(f"summary: expected at most chunk ({chunk}) tokens, got {self.summary}")
        self.num_patterns = check_int("num_patterns", num_patterns, minimum=1)
        if num_patterns * self.summary > self.chunk:
            raise ValueError(
                f"num_patterns: {num_patterns} summaries of {self.summary} tokens do not fit in a "
                f"chunk of {chunk} tokens"
            )
        self.per_head = num_patterns > 1

    def check_num_heads(self, num_heads: int) -> None:
        if num_heads % self.num_patterns:
            raise ValueError(
                f"num_heads: expected a multiple of num_patterns ({self.num_patterns}), got {num_heads}"
            )

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        offset = grid.key_positions() % self.chunk
        k = torch.arange(self.num_patterns).unsqueeze(1)
        summary_keys = ((offset >= self.chunk - (k + 1) * self.summary)
                        & (offset < self.chunk - k * self.summary))  # [num_patterns, Nk]
        mask = grid.same_chunk(self.chunk, causal) | grid.key_set(summary_keys, causal)
        return mask.repeat(num_heads // self.num_patterns, 1, 1) if self.per_head else mask

    def _describe(self) -> str:
        return (f"chunk={self.chunk}, summary={self.summary}, num_patterns={self.num_patterns}, "
                f"block_size={self.block_size}")
