"""The element rules on top of a block layout, as one dense boolean mask.

A BlockLayout says which (query block, key block) pairs are computed; inside them the
element rules decide which (query, key) pairs attend: causal (bottom-right aligned, as the
kernels do), a window (left, right) around the same diagonal, and key padding. element_mask
expands all of it into a [B or 1, layout heads, Nq, Nk] mask: what the dense reference, the
SDPA fallbacks and the benchmarks' masked baselines run with. O(Nq * Nk) memory.
"""

from __future__ import annotations

import torch

from sparse_attention.layout import BlockLayout
from sparse_attention.tensor_layout import TensorLayout
from sparse_attention.memory import check_fits_in_memory


def element_mask(
    layout: BlockLayout | TensorLayout,
    q_len: int,
    k_len: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool mask [B or 1, layout heads, Nq, Nk]: True where query i attends to key j."""
    blocks = layout.mask.to(device)
    if blocks.dim() == 3:  # a BlockLayout: shared by the batch
        blocks = blocks.unsqueeze(0)
    batch = max(blocks.shape[0], 1 if key_padding_mask is None else key_padding_mask.shape[0])
    # Named as the README documents it (sparse_attention.reference.element_mask).
    check_fits_in_memory("reference.element_mask", batch * layout.num_heads * q_len * k_len)
    bs = layout.block_size
    mask = blocks.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)[..., :q_len, :k_len]
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(k_len, device=device).unsqueeze(0)
    dist = j - i - (k_len - q_len)  # signed distance from the bottom-right diagonal
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        mask = mask & (dist >= -left)
    if right is not None:
        mask = mask & (dist <= right)
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.to(device)[:, None, None, :]
    return mask
