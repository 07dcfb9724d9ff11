"""Where and in what precision a run computes: the device, autocast and the gradient scaler."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform

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


# oneDNN instruction sets (ONEDNN_MAX_CPU_ISA values) without bf16 instructions: capped at
# one of these, oneDNN emulates bf16 matmuls (several times slower than fp32).
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# torch.backends.cpu.get_cpu_capability() values whose ATen kernels use bf16 instructions.
ATEN_BF16_CAPABILITIES = ("AVX512",)


@dataclasses.dataclass(frozen=True)
class Precision:
    """The precision a run computes in, and why it was chosen (for the console and the report)."""

    name: str    # fp32, bf16 or fp16
    reason: str  # e.g. "auto: this CPU has no native bf16"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def pick_precision(setting: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for a setting (see choose_precision)."""
    return choose_precision(setting, device).name


def choose_precision(setting: str, device: torch.device) -> Precision:
    """The precision a setting names, with the reason.

    "auto": on CUDA bf16 where the GPU has it, else fp16; on the CPU bf16 only where the CPU
    computes it natively (cpu_bf16() says), else fp32: emulated bf16 makes nn.Linear several
    times slower than fp32."""
    if setting != "auto":
        if setting == "fp16" and device.type == "cpu":
            raise ValueError("precision: fp16 needs a GPU (on the CPU use bf16 or fp32)")
        if setting == "bf16" and device.type == "cpu":
            native, why = cpu_bf16()
            if not native:
                return Precision("bf16", f"as asked, although {why}: bf16 is emulated and may be "
                                         "several times slower than fp32, which --precision auto picks")
        return Precision(setting, "as asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: the GPU computes bf16")
        return Precision("fp16", "auto: the GPU has no bf16; fp16 with a gradient scaler")
    native, why = cpu_bf16()
    return Precision("bf16" if native else "fp32", f"auto: {why}")


def cpu_bf16() -> tuple[bool, str]:
    """Whether torch computes bf16 natively on this CPU, and why (or why not), as torch and
    oneDNN report it, not from the CPU's name.

    x86 needs AVX512_BF16 or AMX-BF16 in the CPU (torch.cpu capabilities), oneDNN allowed to use
    them (ONEDNN_MAX_CPU_ISA, which torch's probes do not all honour, so it is read here too;
    and torch.ops.mkldnn._is_mkldnn_bf16_supported) and ATen's kernels at AVX512
    (torch.backends.cpu.get_cpu_capability(), which honours ATEN_CPU_CAPABILITY). Elsewhere
    (ARM) oneDNN's bf16 check is the CPU's bf16 instructions."""
    capabilities = _cpu_capabilities()
    if not torch.backends.mkldnn.is_available():
        return False, "this torch has no oneDNN, so bf16 matmuls are not native"
    if capabilities.get("architecture", "") in ("x86_64", "x86", "i386", "AMD64") or "avx2" in capabilities:
        hardware = [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]
        if not hardware:
            return False, "this CPU has no native bf16, neither AVX512_BF16 nor AMX-BF16"
        for variable in ONEDNN_ISA_VARIABLES:
            value = os.environ.get(variable, "").strip().upper()
            if value in ONEDNN_ISAS_WITHOUT_BF16:
                return False, f"{variable}={value} keeps oneDNN from this CPU's native bf16"
        aten = torch.backends.cpu.get_cpu_capability()
        if aten not in ATEN_BF16_CAPABILITIES:
            setting = os.environ.get("ATEN_CPU_CAPABILITY")
            cause = f"ATEN_CPU_CAPABILITY={setting}" if setting else f"torch's {aten} kernels"
            return False, f"{cause} keeps torch from this CPU's native bf16"
        if not _mkldnn_bf16():
            return False, "oneDNN does not run bf16 on this CPU"
        return True, f"this CPU computes bf16 natively, with {hardware[0].upper()}"
    if _mkldnn_bf16():
        return True, "this CPU computes bf16 natively, as oneDNN reports"
    return False, "this CPU has no native bf16"


def _cpu_capabilities() -> dict:
    """torch.cpu.get_capabilities() (torch >= 2.9), or what older torch's helpers say."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            return dict(get())
        except (RuntimeError, AttributeError):
            pass
    capabilities = {"architecture": platform.machine()}
    for name, probe in (("avx2", "_is_avx2_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"),
                        ("amx_bf16", "_is_amx_tile_supported")):
        function = getattr(torch.cpu, probe, None)
        if function is not None:
            capabilities[name] = bool(function())
    return capabilities


def _mkldnn_bf16() -> bool:
    """oneDNN's own bf16 check (False under ONEDNN_MAX_CPU_ISA=AVX2, True on AVX512_CORE where
    it would emulate bf16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
