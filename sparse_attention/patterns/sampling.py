"""Seeded random block choice that is the same on every process, platform and thread count.

Each (seed, head, query-block row, key block) gets a 32-bit hash computed with integer tensor
ops (no generator state), and a row keeps its `count` allowed key blocks of smallest hash. A
row's choice therefore depends only on its own absolute index: decoding a token picks the
blocks that the same row picked in the full sequence, and every rank agrees without
communication.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without int64 overflow: c split in 16-bit halves."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) applied elementwise to int64 x (taken mod 2^32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_blocks(seed: int, heads: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Bool [H, R, C]: in every (head, row), `count` allowed blocks (all of them when fewer are
    allowed), chosen by hash. heads [H, 1, 1], rows [R, 1] and cols [1, C] are int64 indices;
    allowed broadcasts to [H, R, C]."""
    key = hash32(hash32(hash32(torch.tensor(seed) ^ 0x5EED) ^ heads) ^ rows)
    score = hash32(key ^ (cols * 0x9E3779B1 & _MASK32))
    shape = torch.broadcast_shapes(score.shape, allowed.shape)
    score = torch.where(allowed, score, 1 << 40).expand(shape)
    count = min(count, shape[-1])
    if count == 0:
        return torch.zeros(shape, dtype=torch.bool)
    picked = torch.zeros(shape, dtype=torch.bool)
    picked.scatter_(-1, score.topk(count, dim=-1, largest=False).indices, True)
    return picked & allowed
