"""The FLOPs the benchmarks credit a run with, so that a rate (FLOP/s) compares times on the
same work.

- Block-sparse work (ours, SDPA with the layout as a mask, Flex on the equivalent BlockMask):
  BlockLayout.flops, 4 * bs * bs * D per computed (query block, key block) pair (the two
  GEMMs; partial blocks count as full), times B * H. Every implementation is credited the
  same FLOPs for the same mask.
- Dense SDPA: 4 * N * N * D * B * H, halved under causal masking (FlashAttention's count).
- Backward: BACKWARD_FACTOR (2.5) times the forward (two GEMMs forward, five backward).
"""

from __future__ import annotations

BACKWARD_FACTOR = 2.5

# The block-sparse count in a few words, for the notes under a results table.
PER_BLOCK = "per computed block (4 * bs^2 * D FLOPs per block pair, backward 2.5x)"


def dense_flops(seq_len: int, head_dim: int, batch: int, heads: int, causal: bool) -> int:
    """Forward FLOPs of dense attention over seq_len queries and keys."""
    flops = 4 * batch * heads * seq_len**2 * head_dim
    return flops // 2 if causal else flops


def backward_flops(forward: float) -> float:
    return BACKWARD_FACTOR * forward


def rate(flops: float, seconds: float | None) -> float | None:
    """FLOP/s, or None without a (positive) time."""
    return None if seconds is None or seconds <= 0 else flops / seconds
