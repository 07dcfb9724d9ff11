"""Incremental decoding: KVCache holds the keys and values of the tokens run so far, and
FullSequenceRows gives a decoding step the layout rows its queries have in the whole sequence."""

from __future__ import annotations

import torch

from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


class KVCache:
    """Per layer, the keys and values [B, H, N, D] of every token run so far.

    Passed to SparseTransformerLM(new_tokens, cache=cache), the new tokens' queries attend to
    the cached keys and their own, and see exactly the keys they see when the whole sequence
    runs at once (see FullSequenceRows).
    """

    def __init__(self):
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: int = 0) -> int:
        """Tokens cached for a layer."""
        cached = self._layers.get(layer)
        return 0 if cached is None else cached[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds a layer's new keys and values; returns all of them."""
        cached = self._layers.get(layer)
        if cached is not None:
            k, v = torch.cat((cached[0], k), dim=2), torch.cat((cached[1], v), dim=2)
        self._layers[layer] = (k, v)
        return k, v


class FullSequenceRows(Pattern):
    """`pattern`, with each query block of a call given its row of the whole sequence's layout.

    A call of Nq queries after Nk - Nq earlier tokens (a decoding step) would otherwise get the
    smallest cover of its own queries; in the whole sequence those queries share a block with
    earlier ones, whose cover can hold more key blocks. Each query block of the call must lie
    inside one block of the sequence: Nk - Nq a multiple of block_size, or all Nq queries in
    the block of the first (SparseTransformer splits its inputs so).
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
