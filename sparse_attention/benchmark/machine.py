"""The machine a benchmark ran on, as every benchmark reports it: CPU model, cores and torch
threads, the CPU features torch sees (AVX2, AVX-512, native bf16) and the instruction set our
CPU kernels run with, the versions of torch, sparse_attention and Python, and the GPU's name
and compute capability when one is visible."""

from __future__ import annotations

import os
import platform

import torch

import sparse_attention as sa

# Feature name -> torch.cpu's check for it (private functions of torch, hence the getattr).
_CPU_FEATURES = {"AVX2": "_is_avx2_supported", "AVX-512": "_is_avx512_supported",
                 "native bf16": "_is_avx512_bf16_supported"}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The features of CPU_FEATURES that torch sees on this CPU, comma-separated ("none")."""
    found = [name for name, check in _CPU_FEATURES.items()
             if getattr(torch.cpu, check, lambda: False)()]
    return ", ".join(found) or "none"


def describe() -> dict:
    """The machine, as a dict of short strings and numbers (for headers and JSON results)."""
    header = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "cpu features": cpu_features(), "cpu capability": sa.cpu_capability(),
              "torch": torch.__version__, "sparse_attention": sa.__version__,
              "python": platform.python_version()}
    if torch.cuda.is_available():
        header["gpu"] = torch.cuda.get_device_name()
        header["gpu capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    return header


def one_line(header: dict) -> str:
    """describe()'s dict in one line: "cpu ... | cores ... | ..."."""
    return " | ".join(f"{key} {value}" for key, value in header.items())
