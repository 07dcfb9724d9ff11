"""Where and in what precision a run computes: the device, autocast and the gradient scaler."""

from __future__ import annotations

import contextlib
import gc

import torch

from sparse_attention import measure

# autocast dtype per precision setting; fp32 runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """The device a setting names ("auto": cuda when available, else cpu)."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for, but torch sees no GPU "
                             f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda is not None})")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_precision(setting: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 ("auto": bf16 on a GPU that has it, else fp16; fp32 on the CPU)."""
    if setting != "auto":
        if setting == "fp16" and device.type == "cpu":
            raise ValueError("precision: fp16 needs a GPU (on the CPU use bf16 or fp32)")
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a forward pass (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (whose small gradients would underflow)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def start_peak_memory(device: torch.device) -> int | None:
    """Starts measuring peak memory; returns the bytes in use now (the CUDA allocator's, or on
    the CPU the process's resident set after freed memory went back to the OS), to subtract."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    measure.return_freed_memory()
    measure.reset_peak_rss()
    return measure.process_memory("VmRSS")


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes since start_peak_memory (None where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return measure.process_memory("VmHWM")
