"""Several processes under torchrun: process groups, model wrapping, agreement between ranks.

The same `sparse-attention train` command runs alone or under
`torchrun --nproc_per_node=K`: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) turns
on DistributedDataParallel (gloo on the CPU, NCCL on GPUs) or FSDP. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def processes_from_environment() -> Processes:
    """This process's place among torchrun's processes (alone without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    return Processes(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def start(processes: Processes, device: torch.device) -> None:
    """Joins the process group (gloo for CPU tensors, NCCL for CUDA ones)."""
    if processes.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def wrap(model: nn.Module, processes: Processes, device: torch.device, strategy: str) -> nn.Module:
    """model in DistributedDataParallel or FSDP across the processes (unchanged alone)."""
    if not processes.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        for block in model.transformer.blocks:
            fully_shard(block)
        return fully_shard(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (FSDP wraps in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def any_rank(flag: bool, processes: Processes, device: torch.device) -> bool:
    """Whether flag is set on any process (all processes then take the same branch)."""
    if not processes.distributed:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def any_rank_each(flags: list[bool], processes: Processes, device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any process (one collective for all of them)."""
    if not processes.distributed:
        return [bool(flag) for flag in flags]
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def sum_over_ranks(values: list[float], processes: Processes, device: torch.device) -> list[float]:
    if not processes.distributed:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def check_same_on_every_rank(what: str, data: bytes, processes: Processes, device: torch.device) -> None:
    """Raises RuntimeError when `data` differs between processes (e.g. a layout built from
    another seed would make the ranks train different models)."""
    if not processes.distributed:
        return
    digest = hashlib.sha256(data).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(processes.world_size)]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, mine) for other in every):
        raise RuntimeError(f"{what} differs between the processes; every rank must build the same")
