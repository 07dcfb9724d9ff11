"""BlockLayout: which (query block, key block) pairs attention computes.

The user-facing form is a dense boolean block mask [heads or 1, ceil(Nq/bs), ceil(Nk/bs)].
Kernels walk compressed lists instead: for every query-block row the key blocks it sees
(forward, dQ) and for every key-block column the query blocks that see it (dK, dV), each
split into full blocks and partial blocks (those the element rules cut: causal diagonal,
window edges, sequence tails). The lists are built once per (Nq, Nk, window, device) and
cached on the instance; building them costs O(number of blocks).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from sparse_attention import ops
from sparse_attention.compile_constants import KnownById
from sparse_attention.kernel_table import CPU_BLOCK_SIZES
from sparse_attention.window import Window

MIN_BLOCK_SIZE = min(CPU_BLOCK_SIZES)
MAX_BLOCK_SIZE = max(CPU_BLOCK_SIZES)  # csrc/size_limits.h has the same
MAX_BLOCKS = 2**31 - 1  # block lists are int32


class BlockLists(NamedTuple):
    """CSR block lists, int32: rows over (layout head, query block), columns over
    (layout head, key block); the first num_full entries of a list need no element mask."""

    row_offsets: torch.Tensor
    row_indices: torch.Tensor
    row_num_full: torch.Tensor
    col_offsets: torch.Tensor
    col_indices: torch.Tensor
    col_num_full: torch.Tensor


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block_size: expected a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, "
            f"got {block_size}"
        )
    return block_size


def check_block_mask(mask, dims: tuple[int, ...], shape_text: str) -> torch.Tensor:
    """A bool block mask with one of `dims` dimensions, none empty, that int32 lists can index."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
    if mask.dim() not in dims or 0 in mask.shape:
        raise ValueError(f"mask: expected a non-empty bool tensor {shape_text}, got shape "
                         f"{tuple(mask.shape)}")
    if mask.numel() >= MAX_BLOCKS:
        raise ValueError(f"mask: {mask.numel()} blocks; block lists index blocks with int32, so at "
                         f"most {MAX_BLOCKS - 1} (use a larger block_size)")
    return mask


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def finer_mask(mask: torch.Tensor, block_size: int, run_block_size: int, q_len: int,
               k_len: int) -> torch.Tensor:
    """A block mask [..., q_blocks, k_blocks] of `block_size` as blocks of `run_block_size`
    (which divides it): every block its sub-blocks, the grid cut to these lengths. The same
    pairs of tokens, for kernels that do not take the layout's block size."""
    if block_size % run_block_size:
        raise ValueError(f"run_block_size: {run_block_size} does not divide block_size {block_size}")
    factor = block_size // run_block_size
    fine = mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return fine[..., :num_blocks(q_len, run_block_size), :num_blocks(k_len, run_block_size)]


class BlockLayout(KnownById):
    """A block-sparse attention layout.

    Args:
        mask: bool tensor [heads, q_blocks, k_blocks] (or [q_blocks, k_blocks], shared by
            all heads). heads is 1 (shared) or the number of query heads.
        block_size: tokens per block, a power of two from 16 to 256.
    """

    def __init__(self, mask: torch.Tensor, block_size: int):
        self.block_size = check_block_size(block_size)
        mask = check_block_mask(mask, (2, 3), "[heads, q_blocks, k_blocks] or [q_blocks, k_blocks]")
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        # A private copy: later edits of the caller's tensor must not change cached lists.
        self._mask = mask.detach().to("cpu", copy=True).contiguous()
        self._nnz = int(self._mask.sum())
        self._lists: dict[tuple, BlockLists] = {}
        self._lock = threading.Lock()

    @property
    def mask(self) -> torch.Tensor:
        """The bool block mask [heads, q_blocks, k_blocks] (CPU; do not modify)."""
        return self._mask

    @property
    def num_heads(self) -> int:
        """Heads of the layout: 1 when shared by all heads."""
        return self._mask.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._mask.shape)

    @property
    def nnz(self) -> int:
        """Number of (head, query block, key block) entries that are set."""
        return self._nnz

    @property
    def density(self) -> float:
        """Fraction of blocks that are set."""
        return self._nnz / self._mask.numel()

    def flops(self, head_dim: int, batch_size: int = 1, num_heads: int | None = None) -> int:
        """Forward FLOPs counted per computed block: 4 * bs^2 * head_dim per block pair
        (two GEMMs), partial blocks counted as full. Backward is 2.5x this.

        num_heads is the number of query heads (needed when the layout is shared)."""
        heads = num_heads if num_heads is not None else self.num_heads
        if self.num_heads not in (1, heads):
            raise ValueError(f"num_heads: the layout has {self.num_heads} heads, got {heads}")
        blocks_per_head = self._nnz * (heads // self.num_heads)
        return 4 * self.block_size**2 * head_dim * blocks_per_head * batch_size

    def check_fits(self, q_len: int, k_len: int, num_heads: int) -> None:
        """Raises ValueError unless this layout fits the given lengths and query heads."""
        _, q_blocks, k_blocks = self._mask.shape
        want = (num_blocks(q_len, self.block_size), num_blocks(k_len, self.block_size))
        if (q_blocks, k_blocks) != want:
            raise ValueError(
                f"layout: a {q_blocks} x {k_blocks} block grid does not fit Nq={q_len}, "
                f"Nk={k_len} with block_size {self.block_size} (expected {want[0]} x {want[1]})"
            )
        if self.num_heads not in (1, num_heads):
            raise ValueError(
                f"layout: has {self.num_heads} heads; expected 1 (shared) or the {num_heads} "
                "query heads"
            )

    def block_lists(self, q_len: int, k_len: int, window, device: torch.device,
                    run_block_size: int | None = None) -> BlockLists:
        """Block lists for these lengths and token window (a Window, a (left, right) pair of
        ints >= 0 or None, or None), cached. run_block_size: lists of blocks of that size (a
        divisor of block_size) covering the same pairs (finer_mask)."""
        window = Window.of(window)
        run_block_size = run_block_size or self.block_size
        key = (q_len, k_len, window, str(device), run_block_size)
        lists = self._lists.get(key)
        if lists is None:
            with self._lock:
                lists = self._lists.get(key)
                if lists is None:
                    mask = self._mask
                    if run_block_size != self.block_size:
                        mask = finer_mask(mask, self.block_size, run_block_size, q_len, k_len)
                    built = ops.build_block_lists(mask, q_len, k_len, run_block_size, window)
                    lists = BlockLists(*(t.to(device) for t in built))
                    self._lists[key] = lists
        return lists

    def __repr__(self) -> str:
        h, qb, kb = self._mask.shape
        return (
            f"BlockLayout(heads={h}, blocks={qb}x{kb}, block_size={self.block_size}, "
            f"density={self.density:.3f})"
        )
