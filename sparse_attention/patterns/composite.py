"""Unions and intersections of patterns (`a | b`, `a & b`), at block granularity."""

from __future__ import annotations

import functools
import operator

import torch

from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid


class _Combination(Pattern):
    """Patterns of one block size combined block by block."""

    _combine = None  # operator.or_ or operator.and_

    def __init__(self, *patterns: Pattern):
        if not patterns:
            raise ValueError("patterns: expected at least one pattern")
        members = []
        for p in patterns:
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns: expected Pattern objects, got {type(p).__name__}")
            # (a | b) | c is one union of three: flat members keep repr and masks simple.
            members.extend(p.patterns if type(p) is type(self) else (p,))
        sizes = {p.block_size for p in members}
        if len(sizes) > 1:
            raise ValueError(f"block_size: the patterns have different block sizes {sorted(sizes)}")
        super().__init__(sizes.pop())
        self.patterns = tuple(members)
        self.per_head = any(p.per_head for p in members)

    def check_num_heads(self, num_heads: int) -> None:
        for p in self.patterns:
            p.check_num_heads(num_heads)

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        masks = [p.block_mask(grid, num_heads, causal) for p in self.patterns]
        return functools.reduce(self._combine, masks)

    def _describe(self) -> str:
        return ", ".join(repr(p) for p in self.patterns)


class Union(_Combination):
    """Blocks set in any of the patterns.

    The kernels apply one token window and one causal rule to a whole call, so the members
    must agree on `token_window` and on being causal by definition."""

    _combine = operator.or_

    def __init__(self, *patterns: Pattern):
        super().__init__(*patterns)
        windows = {p.token_window for p in self.patterns}
        if len(windows) > 1:
            raise ValueError(
                "patterns: a union of patterns with different exact token windows "
                f"{sorted(windows, key=str)} cannot be computed exactly; use exact=False"
            )
        if len({p.causal for p in self.patterns}) > 1:
            raise ValueError("patterns: a union cannot mix causal-only patterns with others")
        self.token_window = windows.pop()
        self.causal = self.patterns[0].causal


class Intersection(_Combination):
    """Blocks set in every one of the patterns; token windows intersect too."""

    _combine = operator.and_

    def __init__(self, *patterns: Pattern):
        super().__init__(*patterns)
        self.causal = any(p.causal for p in self.patterns)
        windows = [p.token_window for p in self.patterns if p.token_window is not None]
        if windows:
            self.token_window = (min(w[0] for w in windows), min(w[1] for w in windows))
