"""TensorLayout: a block layout held as tensors on q's device, made per call and per input.

Content-based block selection (top-k key blocks per query block, per input, per head) makes
a new layout on every call. A TensorLayout keeps it on the device as a bool block mask
[B or 1, heads, q_blocks, k_blocks] (heads: 1, the kv heads or the query heads) and builds the
kernels' block lists from it with tensor ops of static shapes (on the CPU outside compiled
graphs, with the C++ builder): no host sync, no data-dependent shape, O(number of blocks)
work, so CUDA graphs can capture it and torch.compile keeps the layout as a graph input (new
values never recompile).
"""

from __future__ import annotations

import torch

from sparse_attention import ops
from sparse_attention.bounded_cache import BoundedCache
from sparse_attention.compile_constants import KnownById, eager_constant
from sparse_attention.layout import BlockLists, check_block_mask, check_block_size, finer_mask, num_blocks
from sparse_attention.window import Window

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class _KindCache(KnownById):
    """Block kinds per (lengths, block size, window, device): shapes only, so computed once on
    the CPU, copied to the device once, and a constant of compiled graphs."""

    def __init__(self):
        self._kinds = BoundedCache()

    def get(self, q_len, k_len, block_size, window, device) -> torch.Tensor:
        key = (q_len, k_len, block_size, window, device)
        return self._kinds.get(key, lambda: ops.block_kinds(q_len, k_len, block_size, Window(*window))
                               .to(torch.device(device)))


_KINDS = _KindCache()


@eager_constant
def _block_kinds(cache, q_len, k_len, block_size, window, device) -> torch.Tensor:
    return cache.get(q_len, k_len, block_size, window, device)


def _compact(selected: torch.Tensor, full: torch.Tensor):
    """CSR lists of the set entries of `selected` [lists..., blocks_across] (full ones first,
    each part in ascending order), by prefix sums and one scatter: (offsets, indices, num_full)
    with indices of capacity selected.numel() (entries past the last offset unused)."""
    partial = selected & ~full
    counts = selected.sum(-1, dtype=torch.int64)
    num_full = full.sum(-1, dtype=torch.int64)
    offsets = torch.nn.functional.pad(counts.flatten().cumsum(0), (1, 0))
    slot = torch.where(full, full.cumsum(-1) - 1, num_full.unsqueeze(-1) + partial.cumsum(-1) - 1)
    capacity = selected.numel()
    dest = torch.where(selected, offsets[:-1].view(counts.shape).unsqueeze(-1) + slot, capacity)
    across = torch.arange(selected.shape[-1], device=selected.device, dtype=torch.int32)
    indices = torch.zeros(capacity + 1, dtype=torch.int32, device=selected.device)
    indices.scatter_(0, dest.flatten(), across.expand(selected.shape).flatten())
    return offsets.to(torch.int32), indices[:capacity], num_full.to(torch.int32)


def static_block_lists(mask: torch.Tensor, q_len: int, k_len: int, block_size: int,
                       window: Window) -> BlockLists:
    """Block lists of a bool mask [B', heads, qb, kb] by tensor ops of static shapes (the
    indices have capacity mask.numel()): what TensorLayout builds on a GPU and under compile."""
    kinds = _block_kinds(_KINDS, q_len, k_len, block_size, tuple(window), str(mask.device))
    selected = mask & (kinds != 0)
    full = selected & (kinds == 1)
    rows = _compact(selected, full)
    cols = _compact(selected.transpose(-1, -2), full.transpose(-1, -2))
    return BlockLists(*rows, *cols)


class TensorLayout:
    """A block layout as a bool tensor on the device, batched, built per call.

    Make one with `TensorLayout.from_mask` or `TensorLayout.from_indices`; pass it wherever a
    layout is taken (`sa.sparse_attention`, the modules' and models' `layout=`). The element
    rules (causal, window, key padding, tails; rows that see no key give 0) apply as for any
    layout, and q, k, v get gradients (the layout itself is not differentiable).

    Attributes:
        mask: bool [B or 1, heads, q_blocks, k_blocks] on the device.
        block_size: tokens per block.
    """

    def __init__(self, mask: torch.Tensor, block_size: int):
        self.block_size = check_block_size(block_size)
        self.mask = check_block_mask(mask, (4,), "[B or 1, heads, q_blocks, k_blocks]").detach()

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int) -> "TensorLayout":
        """From a bool block mask [B or 1, heads, ceil(Nq/bs), ceil(Nk/bs)] on q's device;
        heads is 1 (shared), Hkv (one per kv head, shared by its GQA group) or H."""
        return cls(mask, block_size)

    @classmethod
    def from_indices(cls, indices: torch.Tensor, block_size: int, num_k_blocks: int,
                     counts: torch.Tensor | None = None) -> "TensorLayout":
        """From the key blocks of every query-block row: `indices` int [B or 1, heads,
        q_blocks, K] (K <= num_k_blocks), in any order. Entries at or past a row's `counts`
        ([B or 1, heads, q_blocks], default K) and negative entries are unused; a repeated
        block counts once. An index >= num_k_blocks is an error (on a GPU it is raised by a
        device-side assert, without a host sync)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in _INDEX_DTYPES:
            raise TypeError("indices: expected an integer tensor [B or 1, heads, q_blocks, K], got "
                            f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        if indices.dim() != 4 or 0 in indices.shape[:3]:
            raise ValueError("indices: expected [B or 1, heads, q_blocks, K] with no empty dimension "
                             f"but K, got shape {tuple(indices.shape)}")
        if isinstance(num_k_blocks, bool) or not isinstance(num_k_blocks, int) or num_k_blocks < 1:
            raise ValueError(f"num_k_blocks: expected an int >= 1, got {num_k_blocks!r}")
        if indices.shape[3] > num_k_blocks:
            raise ValueError(f"indices: K = {indices.shape[3]} entries per row exceed num_k_blocks "
                             f"= {num_k_blocks}")
        indices = indices.long()
        used = indices >= 0
        if counts is not None:
            if not isinstance(counts, torch.Tensor) or counts.dtype not in _INDEX_DTYPES:
                raise TypeError("counts: expected an integer tensor [B or 1, heads, q_blocks]")
            if counts.shape != indices.shape[:3]:
                raise ValueError(f"counts: expected shape {tuple(indices.shape[:3])}, got "
                                 f"{tuple(counts.shape)}")
            if counts.device != indices.device:
                raise ValueError(f"counts: expected device {indices.device}, got {counts.device}")
            position = torch.arange(indices.shape[3], device=indices.device)
            used = used & (position < counts.unsqueeze(-1))
        in_range = (indices < num_k_blocks) | ~used
        if indices.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(in_range.all()):
                bad = int(indices[~in_range].max())
                raise ValueError(f"indices: block {bad} is outside the {num_k_blocks} key blocks")
        else:
            torch._assert_async(in_range.all(), "indices: a key block index >= num_k_blocks")
        mask = torch.zeros(*indices.shape[:3], num_k_blocks + 1, dtype=torch.bool,
                           device=indices.device)
        # Unused entries go to the extra last column, then dropped: static shapes throughout.
        mask.scatter_(-1, torch.where(used, indices, num_k_blocks).clamp(0, num_k_blocks), True)
        return cls(mask[..., :num_k_blocks], block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.mask.shape)

    @property
    def num_heads(self) -> int:
        """Heads of the layout: 1 (shared), the kv heads or the query heads."""
        return self.mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def nnz(self) -> torch.Tensor:
        """Set (batch, head, query block, key block) entries, as a 0-d tensor (no host sync)."""
        return self.mask.sum()

    def density(self) -> torch.Tensor:
        """Fraction of blocks that are set, as a 0-d tensor (no host sync)."""
        return self.mask.float().mean()

    def flops(self, head_dim: int, num_heads: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Forward FLOPs counted per computed block, 4 * bs^2 * head_dim per set block pair
        (as BlockLayout.flops), for `num_heads` query heads and `batch_size` entries."""
        heads = self.num_heads if num_heads is None else num_heads
        batch = self.mask.shape[0] if batch_size is None else batch_size
        per_entry = self.mask.sum(dtype=torch.int64) * (heads // self.num_heads)
        return per_entry * (batch // self.mask.shape[0]) * 4 * self.block_size**2 * head_dim

    def check_fits(self, q: torch.Tensor, k: torch.Tensor, documents: int | None = None) -> None:
        """Raises ValueError unless this layout fits q [B, H, Nq, D] and k [B, Hkv, Nk, D], or
        with `documents` packed documents (cu_seqlens) one grid per document or one for all
        (whose size the op checks against the longest document)."""
        batch, heads, q_len = q.shape[:3]
        kv_heads, k_len = k.shape[1], k.shape[2]
        lb, lh, qb, kb = self.mask.shape
        want = (num_blocks(q_len, self.block_size), num_blocks(k_len, self.block_size))
        if documents is None and (qb, kb) != want:
            raise ValueError(f"layout: a {qb} x {kb} block grid does not fit Nq={q_len}, Nk={k_len} "
                             f"with block_size {self.block_size} (expected {want[0]} x {want[1]})")
        if documents is not None and lb not in (1, documents):
            raise ValueError(f"layout: a TensorLayout for {lb} documents; expected 1 (shared) or "
                             f"one per document ({documents})")
        if documents is None and lb not in (1, batch):
            raise ValueError(f"layout: a layout for {lb} batch entries; expected 1 (shared) or the "
                             f"batch of q ({batch})")
        if lh not in (1, kv_heads, heads):
            raise ValueError(f"layout: has {lh} heads; expected 1 (shared), the kv heads ({kv_heads}) "
                             f"or the query heads ({heads})")
        if self.mask.device != q.device:
            raise ValueError(f"layout: the mask is on {self.mask.device}, q on {q.device}")

    def block_lists(self, q_len: int, k_len: int, window, run_block_size: int | None = None) -> BlockLists:
        """The kernels' row and column lists for these lengths and token window, on the mask's
        device, with no host sync: by tensor ops of static shapes on a GPU and in compiled
        graphs; in eager mode on the CPU (where there is no device to sync with) by the C++
        builder, whose one pass over the blocks is some 25x faster. run_block_size: lists of
        blocks of that size (a divisor of block_size) covering the same pairs."""
        window = Window.of(window)
        mask, block_size = self.mask, self.block_size
        if run_block_size and run_block_size != block_size:
            mask = finer_mask(mask, block_size, run_block_size, q_len, k_len)
            block_size = run_block_size
        if mask.device.type == "cpu" and not torch.compiler.is_compiling():
            lb, lh, qb, kb = mask.shape
            built = ops.build_block_lists(mask.reshape(lb * lh, qb, kb), q_len, k_len, block_size, window)
            return BlockLists(built[0], built[1], built[2].view(lb, lh, qb),
                              built[3], built[4], built[5].view(lb, lh, kb))
        return static_block_lists(mask, q_len, k_len, block_size, window)

    def to_block_layout(self):
        """The BlockLayout of a layout shared by the batch ([1, heads, qb, kb]; copies to the CPU)."""
        from sparse_attention.layout import BlockLayout
        if self.mask.shape[0] != 1:
            raise ValueError(f"layout: a layout for {self.mask.shape[0]} batch entries has no "
                             "BlockLayout (which is shared by the batch)")
        return BlockLayout(self.mask[0], self.block_size)

    def __repr__(self) -> str:
        b, h, qb, kb = self.mask.shape
        return (f"TensorLayout(batch={b}, heads={h}, blocks={qb}x{kb}, block_size={self.block_size}, "
                f"device={self.mask.device})")
