"""Running one function on `world` gloo processes of this machine (loopback only), for the
tests and benchmarks of context parallelism: bounded by a timeout, every process stopped at
the end, each rank's return value (or its error) handed back."""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, timeout_s: float, threads: int, fn, args,
               results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            results.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # handed to the caller, which raises it
        results.put((rank, False, traceback.format_exc()))


def run_on_gloo(fn, world: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """[fn(rank, world, *args) for each rank], each run in its own process of a gloo group.
    fn must be importable (module level). Raises RuntimeError with a rank's traceback if one
    fails, TimeoutError if they have not all returned within timeout_s."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, daemon=True,
                                 args=(rank, world, port, timeout_s, threads, fn, args, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    returned: dict[int, object] = {}
    try:
        while len(returned) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = results.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise TimeoutError(f"{world} gloo processes: ranks {sorted(set(range(world)) - set(returned))} "
                                   f"had not returned after {timeout_s} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
            returned[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [returned[rank] for rank in range(world)]
