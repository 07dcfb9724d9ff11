"""Sharding: which tokens of a sequence each rank of a context-parallel group holds.

"contiguous": rank r holds the r-th of `world` equal pieces. "zigzag": the sequence is cut
into 2 * world chunks and rank r holds chunks r and 2 * world - 1 - r, so that under causal
attention every rank has the same work (as ring-flash-attention and torch's context_parallel
do). A rank's tokens are its chunks concatenated in sequence order, so its local order is
increasing in global position (one causal call covers its own chunks).
"""

from __future__ import annotations

import dataclasses

import torch

SHARDINGS = ("contiguous", "zigzag")


def check_sharding(sharding) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding: expected one of {', '.join(map(repr, SHARDINGS))}, "
                         f"got {sharding!r}")
    return sharding


@dataclasses.dataclass(frozen=True)
class Sharding:
    """The tokens of each of `world` ranks in a sequence of `seq_len` tokens."""

    kind: str
    world: int
    seq_len: int

    def __post_init__(self):
        check_sharding(self.kind)

    def check_whole_blocks(self, block_size: int, name: str = "q") -> None:
        """Raises ValueError (naming the tensor `name`) unless every chunk is whole blocks."""
        if self.seq_len % (self.num_chunks * block_size):
            raise ValueError(
                f"{name}: {self.kind} sharding over {self.world} ranks needs a sequence length "
                f"(world x the shard's {self.shard_len} tokens = {self.seq_len}) divisible by "
                f"{self.num_chunks * block_size} ({self.num_chunks} chunks of whole "
                f"{block_size}-token blocks)")

    @property
    def num_chunks(self) -> int:
        return self.world * (2 if self.kind == "zigzag" else 1)

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def shard_len(self) -> int:
        return self.seq_len // self.world

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The chunk numbers rank holds, in sequence order."""
        if self.kind == "zigzag":
            return (rank, self.num_chunks - 1 - rank)
        return (rank,)

    def positions(self, rank: int) -> torch.Tensor:
        """int64 global positions of rank's tokens, in its local order."""
        return torch.cat([torch.arange(c * self.chunk_len, (c + 1) * self.chunk_len)
                          for c in self.chunks(rank)])

    def block_ids(self, rank: int, block_size: int) -> torch.Tensor:
        """int64 global block numbers of rank's tokens (chunks are whole blocks)."""
        return self.positions(rank)[::block_size] // block_size

    def owners(self, block_size: int) -> torch.Tensor:
        """int64 [seq_len / block_size]: the rank that holds each block."""
        owner = torch.empty(self.seq_len // block_size, dtype=torch.int64)
        for rank in range(self.world):
            owner[self.block_ids(rank, block_size)] = rank
        return owner

    def shard(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        """rank's part of a full-sequence tensor x (the sequence along dim)."""
        return x.index_select(dim, self.positions(rank).to(x.device))

    def unshard(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The full-sequence tensor from every rank's shard (inverse of shard)."""
        order = torch.cat([self.positions(rank) for rank in range(self.world)])
        stacked = torch.cat(shards, dim=dim)
        return stacked.index_select(dim, torch.argsort(order).to(stacked.device))
