"""`sparse-attention train --context-parallel N`: each sequence sharded over N ranks.

The world of torchrun's processes splits into groups of N consecutive ranks; each group
shares one batch (a data-parallel rank) and each of its ranks holds one zigzag shard of every
sequence (its input ids and targets). Attention then runs through
`sparse_attention.distributed.context_parallel_attention` over the group, positions (rotary
or learned) are those of the shard's tokens in the whole sequence, and DDP over the whole
world averages the gradients: every rank's loss is the mean over its equal share of tokens,
so the average over a group's ranks is the gradient of the sequence's mean loss.

The model is not changed: `ContextParallel.install` puts shard-aware stand-ins for the
attention dispatchers, the rotary module and the learned positions in place (the same
parameters, the same state_dict keys), which act as the originals outside `active()`
(evaluation, generation and checkpoints see the plain model).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparse_attention.distributed import context_parallel_attention
from sparse_attention.distributed.sharding import Sharding
from sparse_attention.models.layers import Attention, Rotary

SHARDING = "zigzag"  # balances causal attention's work over the ranks


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: its context-parallel group and the data-parallel rank."""

    size: int  # ranks per sequence
    rank: int  # within the sequence's group
    data_rank: int
    data_world: int


def split_world(rank: int, world_size: int, size: int) -> Layout:
    if world_size % size:
        raise ValueError(f"context_parallel: {size} ranks per sequence do not divide the "
                         f"{world_size} processes (torchrun --nproc_per_node x nodes)")
    return Layout(size, rank % size, rank // size, world_size // size)


class ContextParallel:
    """The process group of one sequence's ranks and the shard-aware model hooks."""

    def __init__(self, layout: Layout, seq_len: int, block_size: int):
        self.layout = layout
        self.sharding = Sharding(SHARDING, layout.size, seq_len)
        self.sharding.check_whole_blocks(block_size, name="seq_len")
        # Every process makes every group, in the same order (torch.distributed's rule); a
        # group of its own keeps the exchanges apart from DDP's all-reduce.
        self.group = None
        for first in range(0, layout.size * layout.data_world, layout.size):
            group = dist.new_group(list(range(first, first + layout.size)))
            if first == layout.data_rank * layout.size:
                self.group = group
        self.positions = self.sharding.positions(layout.rank)
        self._active = False

    def shard_batch(self, batch: dict) -> dict:
        """This rank's shard of every [B, N] tensor of a language-modelling batch."""
        return {name: self.sharding.shard(t, self.layout.rank, 1) for name, t in batch.items()}

    @contextlib.contextmanager
    def active(self):
        """Within: the installed hooks compute on this rank's shard."""
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def install(self, model: nn.Module) -> None:
        """Shard-aware stand-ins in model (before DDP wraps it)."""
        for module in list(model.modules()):
            if isinstance(module, Attention):
                module.dispatch = _ShardedDispatch(module.dispatch, self)
                if isinstance(module.rotary, Rotary):
                    module.rotary = _ShardedRotary(module.rotary, self)
            positions = getattr(module, "positions", None)
            if isinstance(positions, nn.Embedding):
                module.positions = _ShardedPositions(positions, self)


class _ShardedDispatch:
    """An AttentionDispatch that attends over the group while ContextParallel is active."""

    def __init__(self, dispatch, parallel: ContextParallel):
        self.inner, self.parallel = dispatch, parallel

    def __call__(self, q, k, v, *, causal=False, key_padding_mask=None, dropout_p=0.0,
                 scale=None, layout=None, **kwargs):
        if not self.parallel._active:
            return self.inner(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                              dropout_p=dropout_p, scale=scale, layout=layout, **kwargs)
        if dropout_p > 0:
            # The kernels key dropout's bits by the rows of the tensors they get, which are a
            # shard's, not the sequence's: the ranks would not drop what one device drops.
            raise ValueError(f"dropout: attention dropout (p={dropout_p}) is not applied across "
                             "context-parallel shards; set the model's attention_dropout to 0")
        if key_padding_mask is not None or any(value is not None for value in kwargs.values()):
            raise ValueError("context_parallel: no key padding or packed documents across shards")
        return context_parallel_attention(q, k, v, self.inner.pattern if layout is None else layout,
                                          group=self.parallel.group, causal=causal, scale=scale,
                                          sharding=SHARDING)

    def __getattr__(self, name):  # last_path, pattern, choose, ... of the dispatcher
        return getattr(self.inner, name)


class _ShardedRotary(nn.Module):
    """Rotary positions of the shard's tokens while active (its buffers are not saved)."""

    def __init__(self, rotary: Rotary, parallel: ContextParallel):
        super().__init__()
        self.inner, self.parallel = rotary, parallel

    def forward(self, x: torch.Tensor, offset: int = 0, *args, **kwargs) -> torch.Tensor:
        if not self.parallel._active:
            return self.inner(x, offset, *args, **kwargs)
        if offset or any(value is not None for value in (*args, *kwargs.values())):
            raise ValueError("context_parallel: shards take no cache offset or own positions")
        sharding, length = self.parallel.sharding, self.parallel.sharding.chunk_len
        pieces = x.split(length, dim=-2)  # one per chunk, each at its place in the sequence
        return torch.cat([self.inner(piece, chunk * length) for piece, chunk in
                          zip(pieces, sharding.chunks(self.parallel.layout.rank))], dim=-2)


class _ShardedPositions(nn.Module):
    """Learned positions: the embedding's own weight (state_dict key "weight"), looked up at
    the shard's positions while active."""

    def __init__(self, embedding: nn.Embedding, parallel: ContextParallel):
        super().__init__()
        self.weight, self.parallel = embedding.weight, parallel

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.parallel._active:
            indices = self.parallel.positions.to(indices.device)
        return F.embedding(indices, self.weight)


def setup(config, processes) -> ContextParallel | None:
    """The run's ContextParallel (None for --context-parallel 1), its settings checked."""
    size = config.context_parallel
    if size == 1:
        return None
    for wrong, why in ((config.task != "lm", "language modelling only (--task lm)"),
                       (config.distributed != "ddp", "with --distributed ddp only"),
                       (config.compile, "without --compile")):
        if wrong:
            raise ValueError(f"context_parallel: {size} ranks per sequence work {why}")
    return ContextParallel(split_world(processes.rank, processes.world_size, size),
                           config.seq_len, config.block_size)
