"""DeepSpeed's sparsity configs (deepspeed.ops.sparse_attention), same names and arguments.

`make_layout(seq_len)` returns the int64 [num_heads, blocks, blocks] layout DeepSpeed returns
for the same arguments (where DeepSpeed's is deterministic, block for block). Each config is
also a Pattern, so it goes straight into `sparse_attention(q, k, v, config)`. What differs
from DeepSpeed, on purpose:

- attention='unidirectional' makes attention causal inside the diagonal blocks too (the
  kernels' causal rule; DeepSpeed's layouts alone let a query see later keys of its own
  block): `sparse_attention` applies it even when called with causal=False.
- Random blocks respect the direction: unidirectional layouts never draw a future block
  (DeepSpeed's Variable config did), rows with fewer candidates than num_random_blocks take
  them all (DeepSpeed failed), and draws come from `seed` (same on every process) instead of
  Python's global random state.
- seq_len need not be a multiple of the block: the layout has ceil(seq_len / block) blocks a
  side and the kernels handle the partial last block.
- Layouts are cached per config instance and lengths, never per class and length alone.
- Bad arguments raise ValueError naming the argument (DeepSpeed raised NotImplementedError
  for an unknown `attention`).
"""

from __future__ import annotations

import torch

from sparse_attention.layout import num_blocks
from sparse_attention.patterns.arguments import (
    check_attention, check_bool, check_int, check_int_list, renamed,
)
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import Grid
from sparse_attention.patterns.sampling import random_blocks


class SparsityConfig(Pattern):
    """Base of the DeepSpeed configs.

    Args:
        num_heads: attention heads of the layer (calls must use this many).
        block: block size (here a power of two from 16 to 256).
        different_layout_per_head: one layout per head instead of one shared by all.
    """

    def __init__(self, num_heads, block=16, different_layout_per_head=False):
        try:
            super().__init__(block)
        except (TypeError, ValueError) as error:  # DeepSpeed calls the block size `block`
            raise renamed(error, "block_size", "block") from None
        self.num_heads = check_int("num_heads", num_heads, minimum=1)
        self.block = block
        self.different_layout_per_head = check_bool("different_layout_per_head", different_layout_per_head)
        self.num_layout_heads = num_heads if different_layout_per_head else 1
        self.per_head = different_layout_per_head

    def _square(self, n: int) -> torch.Tensor:
        """Bool layout [num_layout_heads or 1, n, n] for n blocks, DeepSpeed's rules.

        The configs here define it; a user subclass written for DeepSpeed defines make_layout
        instead (with setup_layout and check_and_propagate_first_head_layout), and is used
        through it."""
        if type(self).make_layout is SparsityConfig.make_layout:
            raise NotImplementedError(f"{type(self).__name__}: define make_layout(seq_len)")
        layout = self.make_layout(n * self.block_size)
        if not isinstance(layout, torch.Tensor) or tuple(layout.shape) != (self.num_heads, n, n):
            raise ValueError(
                f"make_layout: expected a [{self.num_heads}, {n}, {n}] tensor for {n} blocks, got "
                f"{tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__}"
            )
        return layout.bool()[: self.num_layout_heads]

    def make_layout(self, seq_len: int) -> torch.Tensor:
        """int64 [num_heads, ceil(seq_len / block), ceil(seq_len / block)], 1 = computed."""
        check_int("seq_len", seq_len, minimum=1)
        n = num_blocks(seq_len, self.block_size)
        return self._square(n).expand(self.num_heads, n, n).to(torch.int64).contiguous()

    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """As in DeepSpeed, for subclasses: zeros, int64 [num_heads, blocks, blocks]."""
        check_int("seq_len", seq_len, minimum=1)
        n = num_blocks(seq_len, self.block_size)
        return torch.zeros(self.num_heads, n, n, dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        """As in DeepSpeed, for subclasses: copies head 0 to every head unless heads differ."""
        if not self.different_layout_per_head:
            layout[1:] = layout[0]
        return layout

    def check_num_heads(self, num_heads: int) -> None:
        if num_heads != self.num_heads:
            raise ValueError(f"num_heads: the config was made for {self.num_heads} heads, got {num_heads}")

    def _mask(self, grid: Grid, num_heads: int, causal: bool) -> torch.Tensor:
        if grid.q_blocks > grid.k_blocks:
            raise ValueError(
                f"q_len: a sparsity config needs no more query blocks than key blocks, got Nq="
                f"{grid.q_len}, Nk={grid.k_len}"
            )
        # Query blocks are the last rows of the square layout (decoding: the last row).
        return self._square(grid.k_blocks)[:, grid.rows.squeeze(1)]

    def _indices(self, n: int):
        """Row [n, 1] and column [1, n] block indices, and head indices [heads, 1, 1]."""
        i = torch.arange(n)
        return i.unsqueeze(1), i.unsqueeze(0), torch.arange(self.num_layout_heads).view(-1, 1, 1)

    def _check_fits(self, name: str, count: int, n: int) -> None:
        if n < count:
            raise ValueError(f"{name}: {count} blocks do not fit in a sequence of {n} blocks")

    # Constructor arguments shown by repr, after num_heads and block.
    _shown = ("different_layout_per_head",)

    def _describe(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"num_heads={self.num_heads}, block={self.block}, {shown}"


class _Directed(SparsityConfig):
    """A config with DeepSpeed's attention='unidirectional' | 'bidirectional'."""

    def _set_attention(self, attention: str) -> None:
        self.attention = check_attention(attention)
        self.causal = attention == "unidirectional"

    def _random(self, rows, cols, heads, count: int, seed: int) -> torch.Tensor:
        allowed = cols <= rows if self.causal else torch.ones(rows.shape[0], cols.shape[1], dtype=torch.bool)
        return random_blocks(seed, heads, rows, cols, allowed, count)

    def _global_blocks(self, n: int, starts, ends) -> torch.Tensor:
        """Bool [n]: blocks inside the global ranges [start, end) (clipped to n)."""
        i = torch.arange(n)
        selected = torch.zeros(n, dtype=torch.bool)
        for start, end in zip(starts, ends):
            selected |= (i >= start) & (i < end)
        return selected

    def _global_ranges(self, global_block_indices, global_block_end_indices):
        starts = check_int_list("global_block_indices", global_block_indices)
        if global_block_end_indices is None:
            return starts, tuple(s + 1 for s in starts)
        ends = check_int_list("global_block_end_indices", global_block_end_indices)
        if len(ends) != len(starts):
            raise ValueError(
                f"global_block_end_indices: expected {len(starts)} indices (as many as "
                f"global_block_indices), got {len(ends)}"
            )
        for start, end in zip(starts, ends):
            if start >= end:
                raise ValueError(
                    f"global_block_end_indices: end {end} must be larger than its start {start}"
                )
        return starts, ends



class DenseSparsityConfig(SparsityConfig):
    """Every block (for comparison)."""

    def _square(self, n: int) -> torch.Tensor:
        return torch.ones(1, n, n, dtype=torch.bool)


class FixedSparsityConfig(_Directed):
    """DeepSpeed's Fixed: local windows of num_local_blocks blocks; the last num_global_blocks
    blocks of every window are global columns (and rows, with horizontal_global_attention);
    with different_layout_per_head, head h uses the (h mod num_different_global_patterns)-th
    group from the end instead. A short last window takes its global blocks from its own
    start, or the last blocks of the sequence, as DeepSpeed does."""

    _shown = (
        "different_layout_per_head", "num_local_blocks", "num_global_blocks", "attention", "horizontal_global_attention",
        "num_different_global_patterns",
    )

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_local_blocks=4,
                 num_global_blocks=1, attention="bidirectional", horizontal_global_attention=False,
                 num_different_global_patterns=1):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_local_blocks = check_int("num_local_blocks", num_local_blocks, minimum=1)
        self.num_global_blocks = check_int("num_global_blocks", num_global_blocks, minimum=1)
        if num_local_blocks % num_global_blocks:
            raise ValueError(
                f"num_global_blocks: must divide num_local_blocks ({num_local_blocks}), got "
                f"{num_global_blocks}"
            )
        self._set_attention(attention)
        self.horizontal_global_attention = check_bool("horizontal_global_attention", horizontal_global_attention)
        if horizontal_global_attention and attention != "bidirectional":
            raise ValueError("horizontal_global_attention: only bidirectional attention supports it")
        self.num_different_global_patterns = check_int(
            "num_different_global_patterns", num_different_global_patterns, minimum=1)
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                "num_different_global_patterns: more than one needs different_layout_per_head=True"
            )
        if num_different_global_patterns > num_local_blocks // num_global_blocks:
            raise ValueError(
                f"num_different_global_patterns: at most num_local_blocks / num_global_blocks = "
                f"{num_local_blocks // num_global_blocks}, got {num_different_global_patterns}"
            )

    def _square(self, n: int) -> torch.Tensor:
        rows, cols, heads = self._indices(n)
        window, count = self.num_local_blocks, self.num_global_blocks
        layout = rows // window == cols // window
        if self.causal:
            layout = layout & (cols <= rows)
        first = window - (1 + heads % self.num_different_global_patterns) * count  # [h, 1, 1]
        whole = n - n % window  # blocks in whole windows
        # Global blocks of whole windows: offsets [first, first + count) of each window,
        # seen from the group's first block on under unidirectional attention.
        in_group = (cols % window >= first) & (cols % window < first + count) & (cols < whole)
        group_start = cols - cols % window + first
        # A short last window: count blocks from its offset `first`, or the sequence's last.
        tail_start = torch.clamp(torch.clamp(whole + first, max=n - count), min=0)
        in_tail = (cols >= tail_start) & (cols < tail_start + count) & (whole < n)
        layout = layout | self._global(in_group, group_start, rows, cols)
        layout = layout | self._global(in_tail, tail_start, rows, cols)
        return layout.expand(self.num_layout_heads, n, n)

    def _global(self, selected, start, rows, cols):
        """Global columns (and rows) for column selection `selected` [h, 1, n]."""
        vertical = selected & (rows >= start) if self.causal else selected
        if not self.horizontal_global_attention:
            return vertical
        as_rows = selected.transpose(-1, -2)  # block r is global when column r is
        return vertical | as_rows



class VariableSparsityConfig(_Directed):
    """DeepSpeed's Variable: random blocks, local windows of the listed sizes (the last size
    repeats to the end), and global blocks by index or by [start, end) ranges.

    `seed` (an addition) seeds the random blocks."""

    _shown = (
        "different_layout_per_head", "num_random_blocks", "local_window_blocks", "global_block_indices",
        "global_block_end_indices", "attention", "horizontal_global_attention", "seed",
    )

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_random_blocks=0,
                 local_window_blocks=(4,), global_block_indices=(0,), global_block_end_indices=None,
                 attention="bidirectional", horizontal_global_attention=False, *, seed=0):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = check_int("num_random_blocks", num_random_blocks)
        self.local_window_blocks = check_int_list("local_window_blocks", local_window_blocks, minimum=1)
        self.global_block_indices = tuple(global_block_indices)
        self.global_block_end_indices = global_block_end_indices
        self._starts, self._ends = self._global_ranges(global_block_indices, global_block_end_indices)
        self._set_attention(attention)
        self.horizontal_global_attention = check_bool("horizontal_global_attention", horizontal_global_attention)
        if horizontal_global_attention and attention != "bidirectional":
            raise ValueError("horizontal_global_attention: only bidirectional attention supports it")
        self.seed = check_int("seed", seed)

    def _window_starts(self, n: int) -> torch.Tensor:
        """First block of the local window holding each of n blocks."""
        sizes = torch.tensor(self.local_window_blocks)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])  # listed windows
        listed_end, last = int(starts[-1]), self.local_window_blocks[-1]
        i = torch.arange(n)
        listed = starts[torch.searchsorted(starts, i, right=True) - 1]
        repeated = listed_end + (i - listed_end) // last * last
        return torch.where(i < listed_end, listed, repeated)

    def _square(self, n: int) -> torch.Tensor:
        rows, cols, heads = self._indices(n)
        self._check_fits("num_random_blocks", self.num_random_blocks, n)
        layout = self._random(rows, cols, heads, self.num_random_blocks, self.seed)
        start = self._window_starts(n)
        local = start.unsqueeze(1) == start.unsqueeze(0)
        layout = layout | (local & (cols <= rows) if self.causal else local)
        selected = self._global_blocks(n, self._starts, self._ends).unsqueeze(0)  # [1, n] columns
        # Unidirectional: a global range is seen from its first block on.
        range_start = torch.full((n,), n)
        for s, e in zip(self._starts, self._ends):
            i = torch.arange(n)
            range_start = torch.where((i >= s) & (i < e), torch.clamp(range_start, max=s), range_start)
        vertical = selected & (rows >= range_start.unsqueeze(0)) if self.causal else selected
        layout = layout | vertical
        if self.horizontal_global_attention:
            layout = layout | selected.transpose(0, 1)
        return layout.expand(self.num_layout_heads, n, n)



class BigBirdSparsityConfig(_Directed):
    """DeepSpeed's BigBird: random blocks, a sliding window of num_sliding_window_blocks
    (centred), and the first num_global_blocks blocks as global rows and columns; the lower
    triangle only under unidirectional attention. `seed` (an addition) seeds the random
    blocks."""

    _shown = (
        "different_layout_per_head", "num_random_blocks", "num_sliding_window_blocks", "num_global_blocks", "attention",
        "seed",
    )

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_random_blocks=1,
                 num_sliding_window_blocks=3, num_global_blocks=1, attention="bidirectional", *, seed=0):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_random_blocks = check_int("num_random_blocks", num_random_blocks)
        self.num_sliding_window_blocks = check_int("num_sliding_window_blocks", num_sliding_window_blocks)
        self.num_global_blocks = check_int("num_global_blocks", num_global_blocks)
        self._set_attention(attention)
        self.seed = check_int("seed", seed)

    def _square(self, n: int) -> torch.Tensor:
        rows, cols, heads = self._indices(n)
        self._check_fits("num_random_blocks", self.num_random_blocks, n)
        self._check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, n)
        self._check_fits("num_global_blocks", self.num_global_blocks, n)
        layout = self._random(rows, cols, heads, self.num_random_blocks, self.seed)
        layout = layout | ((rows - cols).abs() <= self.num_sliding_window_blocks // 2)
        layout = layout | (rows < self.num_global_blocks) | (cols < self.num_global_blocks)
        if self.causal:
            layout = layout & (cols <= rows)
        return layout.expand(self.num_layout_heads, n, n)



class BSLongformerSparsityConfig(_Directed):
    """DeepSpeed's block-sparse Longformer: a sliding window of num_sliding_window_blocks
    (centred) and global blocks (rows and columns) by index or [start, end) ranges; the lower
    triangle only under unidirectional attention."""

    _shown = (
        "different_layout_per_head", "num_sliding_window_blocks", "global_block_indices", "global_block_end_indices",
        "attention",
    )

    def __init__(self, num_heads, block=16, different_layout_per_head=False, num_sliding_window_blocks=3,
                 global_block_indices=(0,), global_block_end_indices=None, attention="bidirectional"):
        super().__init__(num_heads, block, different_layout_per_head)
        self.num_sliding_window_blocks = check_int("num_sliding_window_blocks", num_sliding_window_blocks)
        self.global_block_indices = tuple(global_block_indices)
        self.global_block_end_indices = global_block_end_indices
        self._starts, self._ends = self._global_ranges(global_block_indices, global_block_end_indices)
        self._set_attention(attention)

    def _square(self, n: int) -> torch.Tensor:
        rows, cols, _ = self._indices(n)
        self._check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, n)
        layout = (rows - cols).abs() <= self.num_sliding_window_blocks // 2
        selected = self._global_blocks(n, self._starts, self._ends)
        layout = layout | selected.unsqueeze(0) | selected.unsqueeze(1)
        if self.causal:
            layout = layout & (cols <= rows)
        return layout.expand(self.num_layout_heads, n, n)



class LocalSlidingWindowSparsityConfig(_Directed):
    """DeepSpeed's purely local sliding window of num_sliding_window_blocks (centred;
    unidirectional: the num_sliding_window_blocks // 2 blocks before the diagonal block)."""

    _shown = ("num_sliding_window_blocks", "attention")

    def __init__(self, num_heads, block=16, num_sliding_window_blocks=3, attention="unidirectional"):
        super().__init__(num_heads, block)
        self.num_sliding_window_blocks = check_int("num_sliding_window_blocks", num_sliding_window_blocks)
        self._set_attention(attention)

    def _square(self, n: int) -> torch.Tensor:
        rows, cols, _ = self._indices(n)
        self._check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, n)
        distance = rows - cols
        w = self.num_sliding_window_blocks // 2
        layout = (distance <= w) & (distance >= (0 if self.causal else -w))
        return layout.unsqueeze(0)



__all__ = [
    "BSLongformerSparsityConfig", "BigBirdSparsityConfig", "DenseSparsityConfig",
    "FixedSparsityConfig", "LocalSlidingWindowSparsityConfig", "SparsityConfig",
    "VariableSparsityConfig",
]
