"""Context parallelism: one sequence sharded across the ranks of a torch.distributed group,
with only the key/value blocks the layout needs sent between them (see
docs/context_parallel.md)."""

from sparse_attention.distributed.context_parallel import (
    context_parallel_attention, group_sharding, plan_for,
)
from sparse_attention.distributed.exchange import Traffic, traffic
from sparse_attention.distributed.plan import Plan, make_plan, needed_blocks
from sparse_attention.distributed.sharding import SHARDINGS, Sharding

__all__ = ["Plan", "SHARDINGS", "Sharding", "Traffic", "context_parallel_attention",
           "group_sharding", "make_plan", "needed_blocks", "plan_for", "traffic"]
