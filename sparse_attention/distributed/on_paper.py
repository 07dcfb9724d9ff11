"""Traffic on paper: what each rank of a context-parallel group sends and how many messages
it takes, from the layout alone (no attention runs), against a ring that passes every K/V
shard around (the dense ring of ring attention: world - 1 steps of a whole shard)."""

from __future__ import annotations

import dataclasses

from sparse_attention.distributed.plan import block_mask_4d, needed_blocks
from sparse_attention.distributed.sharding import Sharding


@dataclasses.dataclass(frozen=True)
class PaperTraffic:
    """K/V tokens a rank receives (the most over the ranks, and the mean) and messages per
    rank (the most), in the forward; the backward sends the same amounts of dK/dV back.
    bytes_per_token: K + V of one token."""

    seq_len: int
    world: int
    tokens_received: int
    mean_tokens_received: float
    messages: int
    ring_tokens: int
    ring_steps: int
    bytes_per_token: int

    @property
    def bytes_received(self) -> int:
        return self.tokens_received * self.bytes_per_token

    @property
    def ring_bytes(self) -> int:
        return self.ring_tokens * self.bytes_per_token

    @property
    def fraction_of_ring(self) -> float:
        return self.tokens_received / self.ring_tokens


def kv_bytes_per_token(kv_heads: int, head_dim: int, element_size: int, batch: int = 1) -> int:
    return 2 * batch * kv_heads * head_dim * element_size


def traffic_on_paper(layout, world: int, *, causal: bool, sharding: str = "contiguous",
                     bytes_per_token: int = kv_bytes_per_token(8, 128, 2)) -> PaperTraffic:
    """The traffic of a BlockLayout of the whole sequence (as pattern.layout(N, N, causal=)
    gives) over `world` ranks."""
    bs = layout.block_size
    seq = Sharding(sharding, world, layout.mask.shape[-1] * bs)
    seq.check_whole_blocks(bs, name="layout")
    needed = needed_blocks(block_mask_4d(layout), seq, bs, causal)
    owners = seq.owners(bs)
    received, messages = [], []
    for rank in range(world):
        remote = needed[rank] & (owners != rank)
        received.append(int(remote.sum()) * bs)
        messages.append(len(set(owners[remote].tolist())))
    return PaperTraffic(seq.seq_len, world, max(received), sum(received) / world, max(messages),
                        (world - 1) * seq.shard_len, world - 1, bytes_per_token)
