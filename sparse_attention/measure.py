"""Peak memory of a callable and of this process, and byte counts in words, for the benchmarks
and training. (The benchmarks time calls with sparse_attention.benchmark.timing.)"""

from __future__ import annotations

import ctypes
import gc
from typing import Callable

import torch


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int | None:
    """Bytes by which one call of fn raises peak memory above what was in use before it.

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak resident set, reset
    through /proc/self/clear_refs. None where neither can be measured."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return_freed_memory()
    if not reset_peak_rss():
        return None
    before = process_memory("VmRSS")
    fn()
    after = process_memory("VmHWM")
    return None if before is None or after is None else after - before


def reset_peak_rss() -> bool:
    """Resets the process's peak resident set (VmHWM) to the current one (Linux); False
    where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """Hands memory freed by earlier work back to the OS (glibc), so that the resident set
    before a measurement holds only live data and reused pages do not hide new ones."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_memory(field: str) -> int | None:
    """Bytes of a /proc/self/status field (VmRSS: resident now, VmHWM: peak resident), or
    None where the OS does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
