"""Seeded, resumable batch order across data-parallel ranks."""

from __future__ import annotations

import hashlib

import torch


class ResumableSampler:
    """Yields each rank's share of one global batch at a time. A global batch is
    batch_size * world_size indices of the epoch's permutation, rank r taking the r-th
    contiguous slice; an epoch ends when fewer than a global batch remain (the remainder is
    skipped, so every batch is full). The state is (epoch, position): a sampler restored from
    it yields exactly the batches an uninterrupted one would."""

    def __init__(self, num_items: int, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"data: batch-size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"data: rank must be in [0, world_size), got rank {rank} of {world_size}")
        if num_items < batch_size * world_size:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise ValueError(f"data: batch-size {batch_size}{ranks} needs at least "
                             f"{batch_size * world_size} sequences, the data has {num_items}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0  # where the next global batch starts in this epoch's order
        self._order = self._order_of(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self) -> list[int]:
        global_batch = self.batch_size * self.world_size
        if self.num_items - self._position < global_batch:
            self._epoch += 1
            self._position = 0
            self._order = self._order_of(self._epoch)
        start = self._position + self.rank * self.batch_size
        self._position += global_batch
        return self._order[start:start + self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_items", self.num_items) != self.num_items:
            raise ValueError(f"data: the sampler state is for {state['num_items']} sequences, the "
                             f"data has {self.num_items}: the data changed since the checkpoint")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(f"data: bad sampler state (epoch {epoch}, position {position})")
        self._epoch, self._position = epoch, position
        self._order = self._order_of(epoch)

    def _order_of(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        # A seed per (seed, epoch) pair, the same on every rank and machine.
        digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randperm(self.num_items, generator=generator)
