"""The benchmark grid: which patterns, lengths, head dims and dtypes are measured."""

from __future__ import annotations

import dataclasses

import torch

import sparse_attention as sa

# Patterns of the suite and whether each runs causal (language-model style) or
# bidirectional (encoder style, as BigBird is used). "dense" (every causal block) compares our
# per-block rate with dense SDPA's on the same work; it is not in the default grid.
CAUSAL_BY_PATTERN = {"local": True, "strided": True, "fixed": True, "bigbird": False,
                     "dense": True}

FULL_GRID = {
    "patterns": ("local", "strided", "fixed", "bigbird"),
    "seq_lens": (1024, 2048, 4096, 8192, 16384, 32768),
    "head_dims": (64, 128),
    "dtypes": ("float32", "bfloat16"),
}
QUICK_GRID = {
    "patterns": ("local", "fixed"),
    "seq_lens": (1024, 2048, 4096),
    "head_dims": (64,),
    "dtypes": ("float32",),
}


@dataclasses.dataclass(frozen=True)
class Case:
    pattern: str
    seq_len: int
    head_dim: int
    dtype: str
    batch: int
    heads: int
    block_size: int

    @property
    def causal(self) -> bool:
        return CAUSAL_BY_PATTERN.get(self.pattern, True)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def layout(self) -> sa.BlockLayout:
        """The pattern's layout for this case, with its sqrt(N) defaults (see from_name)."""
        pattern = sa.patterns.from_name(
            self.pattern, seq_len=self.seq_len, block_size=self.block_size, num_heads=self.heads
        )
        return pattern.layout(self.seq_len, num_heads=self.heads, causal=self.causal)


def grid(patterns, seq_lens, head_dims, dtypes, batch: int, heads: int, block_size: int) -> list[Case]:
    """Cases ordered so that one (dtype, head dim, N) shares its dense baseline."""
    for name in patterns:
        if name not in CAUSAL_BY_PATTERN:
            raise ValueError(f"patterns: expected names from {sorted(CAUSAL_BY_PATTERN)}, got {name!r}")
    return [
        Case(pattern, n, d, dtype, batch, heads, block_size)
        for dtype in dtypes
        for d in head_dims
        for n in seq_lens
        for pattern in patterns
    ]
