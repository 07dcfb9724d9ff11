"""The exchange plan of one rank, from the layout alone: which key blocks its query rows need
from every other rank, which of its own blocks every other rank needs, and the sub-layouts
(its rows x the columns of each piece of keys) its attention calls run with.

Chunks are whole blocks, so under causal a block pair is either on the diagonal (only inside
a rank's own chunks, which one causal call covers), wholly before (seen without an element
mask) or wholly after (never needed): applying the block-level causal rule to the rows is
all a remote piece needs, and the keys it receives need not be contiguous.
"""

from __future__ import annotations

import dataclasses

import torch

from sparse_attention.distributed.sharding import Sharding
from sparse_attention.layout import BlockLayout
from sparse_attention.tensor_layout import TensorLayout


def block_mask_4d(layout: BlockLayout | TensorLayout) -> torch.Tensor:
    """The layout's bool block mask as [B or 1, heads, q_blocks, k_blocks]."""
    return layout.mask if isinstance(layout, TensorLayout) else layout.mask.unsqueeze(0)


def rows_of(mask: torch.Tensor, sharding: Sharding, rank: int, block_size: int,
            causal: bool) -> torch.Tensor:
    """mask's rows of rank's query blocks, with the block-level causal rule applied."""
    rows = sharding.block_ids(rank, block_size).to(mask.device)
    sub = mask.index_select(-2, rows)
    if causal:
        columns = torch.arange(mask.shape[-1], device=mask.device)
        sub = sub & (columns <= rows.unsqueeze(-1))
    return sub


def needed_blocks(mask: torch.Tensor, sharding: Sharding, block_size: int,
                  causal: bool) -> torch.Tensor:
    """bool [world, k_blocks] on the CPU: the key blocks each rank's query rows see (in any
    head or batch entry), its own included."""
    return torch.stack([
        rows_of(mask, sharding, rank, block_size, causal).flatten(0, -2).any(0).cpu()
        for rank in range(sharding.world)
    ])


@dataclasses.dataclass
class Plan:
    """What one rank sends, receives and computes.

    local_layout: its rows x its own keys (None when empty); called with the causal rule.
    receive_blocks: source rank -> global key blocks it receives from there (ascending).
    remote_layouts: source rank -> its rows x those blocks (no element mask needed).
    send_tokens: destination rank -> positions, in this rank's shard, of the tokens it sends.
    """

    rank: int
    causal: bool
    block_size: int
    local_layout: BlockLayout | TensorLayout | None
    receive_blocks: dict[int, torch.Tensor]
    remote_layouts: dict[int, BlockLayout | TensorLayout]
    send_tokens: dict[int, torch.Tensor]

    @property
    def sources(self) -> list[int]:
        return list(self.receive_blocks)

    def received_tokens(self, source: int) -> int:
        return len(self.receive_blocks[source]) * self.block_size


def ring_order(rank: int, world: int) -> list[int]:
    """The other ranks, nearest before rank first (the order of a ring's steps)."""
    return [(rank - step) % world for step in range(1, world)]


def make_plan(layout: BlockLayout | TensorLayout, sharding: Sharding, rank: int,
              causal: bool) -> Plan:
    mask, bs = block_mask_4d(layout), layout.block_size
    needed = needed_blocks(mask, sharding, bs, causal)
    owners = sharding.owners(bs)
    my_blocks = sharding.block_ids(rank, bs)
    # A block's place in its owner's shard, to turn global blocks into local token positions.
    place = torch.empty_like(owners)
    for other in range(sharding.world):
        ids = sharding.block_ids(other, bs)
        place[ids] = torch.arange(len(ids))

    def sub_layout(columns: torch.Tensor):
        sub = rows_of(mask, sharding, rank, bs, causal).index_select(-1, columns.to(mask.device))
        if not bool(sub.any()):
            return None
        return TensorLayout.from_mask(sub, bs) if isinstance(layout, TensorLayout) \
            else BlockLayout(sub[0], bs)

    receive_blocks, remote_layouts, send_tokens = {}, {}, {}
    for other in ring_order(rank, sharding.world):
        blocks = torch.nonzero(needed[rank] & (owners == other)).flatten()
        if len(blocks):
            receive_blocks[other] = blocks
            remote_layouts[other] = sub_layout(blocks)
        wanted = torch.nonzero(needed[other] & (owners == rank)).flatten()
        if len(wanted):
            starts = place[wanted] * bs
            send_tokens[other] = (starts.unsqueeze(-1) + torch.arange(bs)).flatten()
    return Plan(rank, causal, bs, sub_layout(my_blocks), receive_blocks, remote_layouts,
                send_tokens)
