"""The benchmarks' one timer: the median time of repeated calls, after warm-up calls.

On the CPU each call is timed with time.perf_counter. On CUDA each call is timed with a pair
of CUDA events recorded around it on the current stream and read after
torch.cuda.synchronize(), so the time is the GPU's, not the launch's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, *,
                device: torch.device | str = "cpu", budget: float | None = None) -> float:
    """Median seconds of `repeats` calls of fn after `warmup` calls.

    budget: seconds of timed calls at most; a call slower than budget / repeats (judged by the
    last warm-up call, so it needs warmup >= 1) gets fewer repeats, one at least."""
    if budget is not None and warmup < 1:
        raise ValueError("budget: needs warmup >= 1 (a warm-up call is what it is judged by)")
    clock = _cuda_seconds if torch.device(device).type == "cuda" else _cpu_seconds
    for _ in range(warmup):
        last = clock(fn)
    if budget is not None:
        repeats = max(1, min(repeats, int(budget / max(last, 1e-9))))
    return statistics.median(clock(fn) for _ in range(repeats))


def _cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_seconds(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
