"""Pattern: an attention pattern that builds a BlockLayout for any lengths and head count."""

from __future__ import annotations

import torch

from sparse_attention.bounded_cache import BoundedCache
from sparse_attention.compile_constants import KnownById
from sparse_attention.layout import BlockLayout
from sparse_attention.patterns.arguments import check_block_size, check_bool, check_int
from sparse_attention.patterns.grid import Grid


class Pattern(KnownById):
    """Base class of attention patterns.

    A pattern is a rule saying which keys each query sees, defined on absolute positions (see
    `sparse_attention.patterns.grid`). `layout(q_len, k_len, num_heads=, causal=)` returns the
    smallest BlockLayout that covers the rule; the kernels then apply the element rules
    (causal, `token_window`, sequence tails) inside the partial blocks.

    Attributes:
        block_size: tokens per block (a power of two from 16 to 256).
        token_window: (left, right) exact token window that `sparse_attention` applies inside
            the blocks (None: the pattern is exactly its blocks).
        causal: True when the pattern is causal by definition: `sparse_attention` then applies
            the causal rule even when called with causal=False.
        per_head: True when heads get different layouts ([num_heads, qb, kb] instead of
            [1, qb, kb]).

    Subclasses implement `_mask(grid, num_heads, causal)`. `a | b` is the union of two
    patterns' layouts, `a & b` their intersection.
    """

    token_window: tuple[int, int] | None = None
    causal: bool = False
    per_head: bool = False

    def __init__(self, block_size: int = 64):
        self.block_size = check_block_size(block_size)
        self._layouts = BoundedCache()

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        """Bool block mask [num_heads or 1, qb, kb] of the rule on this grid."""
        raise NotImplementedError

    def block_mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        """Bool block mask [num_heads or 1, qb, kb] (or [qb, kb]) on a grid, with the causal
        rule applied (also when the pattern is causal by definition). Under causal, the rows
        are those of the whole-sequence blocks (see `sparse_attention.patterns.grid`)."""
        causal = causal or self.causal
        if not causal:
            return self._mask(grid, num_heads, causal)
        whole = grid.whole_blocks()
        mask = self._mask(whole, num_heads, causal) & whole.visible()
        return grid.rows_from_whole(mask) & grid.visible()

    def check_num_heads(self, num_heads: int) -> None:
        """Raises ValueError when the pattern cannot serve num_heads heads."""

    def layout(self, q_len: int, k_len: int | None = None, *, num_heads: int = 1,
               causal: bool = False) -> BlockLayout:
        """The BlockLayout of this pattern for Nq = q_len queries and Nk = k_len keys
        (default q_len), cached per instance and (q_len, k_len, num_heads, causal).

        Under causal, blocks that lie wholly after their queries are never set. A pattern with
        per-head variation gives [num_heads, qb, kb]; otherwise [1, qb, kb], shared by heads."""
        key = self._check_call(q_len, k_len, num_heads, causal)
        return self._layouts.get(key, lambda: self._build_layout(*key))

    def _build_layout(self, q_len: int, k_len: int, num_heads: int, causal: bool) -> BlockLayout:
        grid = Grid(q_len, k_len, self.block_size)
        mask = self.block_mask(grid, num_heads, causal)
        heads = num_heads if self.per_head else 1
        return BlockLayout(mask.expand(heads, *grid.shape), self.block_size)

    def _check_call(self, q_len, k_len, num_heads, causal) -> tuple:
        check_int("q_len", q_len, minimum=1)
        k_len = q_len if k_len is None else check_int("k_len", k_len, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_bool("causal", causal)
        self.check_num_heads(num_heads)
        return q_len, k_len, num_heads, causal

    def __or__(self, other: "Pattern") -> "Pattern":
        from sparse_attention.patterns.composite import Union
        return Union(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        from sparse_attention.patterns.composite import Intersection
        return Intersection(self, other)

    def _describe(self) -> str:
        """Constructor arguments for repr."""
        return f"block_size={self.block_size}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"
