"""sa.supported(): whether the kernels can run a case, and if not, why.

Answers from sparse_attention.kernel_table, the same table the CUDA instantiations are
generated from, so the supported set is written once. Never touches a GPU at import time.
"""

from __future__ import annotations

import functools
import os

import torch

from sparse_attention import kernel_table as table
from sparse_attention._extension import built_with_cuda

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}
_CUDA_KERNELS = {"forward": "the forward pass", "grad_kv": "the backward pass (dK, dV)",
                 "grad_kv_before_dq_pass": "the backward pass (dK, dV)",
                 "grad_q": "the deterministic backward pass (dQ)"}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        return _DTYPE_NAMES[dtype]
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in _DTYPE_NAMES.values():
            return name
    raise TypeError(f"dtype: expected a torch.dtype such as torch.bfloat16, got {dtype!r}")


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        return torch.device(device).type
    raise TypeError(f"device_type: expected 'cpu', 'cuda' or a torch.device, got {device!r}")


def block_sizes(device_type: str = "cpu") -> tuple[int, ...]:
    """The layout block sizes the kernels of a device type run."""
    device_type = _device_type(device_type)
    return table.CUDA_BLOCK_SIZES if device_type == "cuda" else table.CPU_BLOCK_SIZES


def _cpu_reasons(dtype: str, head_dim: int, block_size: int) -> list[str]:
    reasons = []
    if dtype not in table.CPU_DTYPES:
        reasons.append(f"dtype {dtype}: the CPU kernels take {', '.join(table.CPU_DTYPES)}")
    if not 1 <= head_dim <= table.CPU_MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim}: the CPU kernels take 1 to {table.CPU_MAX_HEAD_DIM}")
    if block_size not in table.CPU_BLOCK_SIZES:
        reasons.append(f"block_size {block_size}: the CPU kernels take "
                       f"{', '.join(map(str, table.CPU_BLOCK_SIZES))}")
    return reasons


NO_CUDA_BUILD = ("cuda: this build of sparse_attention has no CUDA kernels (it was compiled "
                 "without nvcc or against a CPU build of torch; reinstall with "
                 "SPARSE_ATTENTION_CUDA=1 to require them)")


def _cuda_reasons(dtype: str, head_dim: int, block_size: int, capability) -> list[str]:
    reasons = []
    if dtype not in table.CUDA_DTYPES:
        reasons.append(f"dtype {dtype}: the CUDA kernels take {', '.join(table.CUDA_DTYPES)} "
                       "(run under torch.autocast('cuda') or convert q, k, v)")
    kernel_head_dim = table.cuda_kernel_head_dim(head_dim)
    if head_dim < 1 or kernel_head_dim is None:
        reasons.append(f"head_dim {head_dim}: the CUDA kernels take 1 to {table.CUDA_HEAD_DIMS[-1]} "
                       f"(compiled for {', '.join(map(str, table.CUDA_HEAD_DIMS))}; others run "
                       "zero-padded to the next)")
    old_gpu = capability is not None and tuple(capability) < table.CUDA_MIN_CAPABILITY
    if old_gpu:
        need = "{}.{}".format(*table.CUDA_MIN_CAPABILITY)
        reasons.append(f"GPU sm_{capability[0]}{capability[1]}: the CUDA kernels need compute "
                       f"capability {need} or newer")
    if kernel_head_dim is not None and not old_gpu and _cuda_run_block_size(
            kernel_head_dim, block_size, capability) is None:
        reasons += _cuda_block_reasons(head_dim, kernel_head_dim, block_size, capability)
    return reasons


def _cuda_block_reasons(head_dim: int, kernel_head_dim: int, block_size: int, capability) -> list[str]:
    """Why the CUDA kernels cannot run blocks of this size themselves at this head dim."""
    if block_size not in table.CUDA_BLOCK_SIZES:
        return [f"block_size {block_size}: the CUDA kernels take "
                f"{', '.join(map(str, table.CUDA_BLOCK_SIZES))} and their multiples"]
    if capability is None:
        return []
    arch = f"sm_{capability[0]}{capability[1]}"
    limit = table.cuda_shared_limit(tuple(capability))
    # Where the dQ atomics' dK/dV kernel does not fit, the backward takes the dQ pass, whose
    # dK/dV kernel needs less.
    dq_pass = table.cuda_backward_takes_dq_pass(kernel_head_dim, block_size, limit)
    skipped = "grad_kv" if dq_pass else "grad_kv_before_dq_pass"
    padded = f" (run at {kernel_head_dim})" if kernel_head_dim != head_dim else ""
    reasons = []
    for kernel, what in _CUDA_KERNELS.items():
        need = table.cuda_shared_bytes(kernel, kernel_head_dim, block_size)
        if kernel != skipped and need > limit:
            reasons.append(f"GPU {arch}: {what} at head_dim {head_dim}{padded}, block_size "
                           f"{block_size} needs {need // 1024} KB of shared memory per thread "
                           f"block; {arch} offers {limit // 1024} KB")
    return reasons


@functools.lru_cache(maxsize=256)
def _cuda_run_block_size(kernel_head_dim: int, block_size: int, capability) -> int | None:
    # The layout's block size if the kernels take it here, else the largest compiled one that
    # divides it and that they take (each layout block runs as its sub-blocks).
    candidates = [block_size] + sorted((b for b in table.CUDA_BLOCK_SIZES
                                        if b < block_size and block_size % b == 0), reverse=True)
    return next((b for b in candidates if b in table.CUDA_BLOCK_SIZES and
                 not _cuda_block_reasons(kernel_head_dim, kernel_head_dim, b, capability)), None)


def cuda_run_block_size(head_dim: int, block_size: int, *,
                        capability: tuple[int, int] | None = None) -> int | None:
    """The block size the CUDA kernels run a layout of `block_size` at: itself where they take
    it, else the largest compiled block size that divides it and fits the GPU's shared memory
    (256 runs as blocks of 128; 128 at head dim 128 on the 99 KB of sm_86, sm_89 and sm_120 as
    blocks of 64), each layout block as its sub-blocks: the same attention. None where no
    compiled size does (16, 32: the gathered path)."""
    kernel_head_dim = table.cuda_kernel_head_dim(head_dim)
    if kernel_head_dim is None or head_dim < 1:
        return None
    return _cuda_run_block_size(kernel_head_dim, block_size,
                                None if capability is None else tuple(capability))


def _term_reasons(device_type: str, terms) -> list[str]:
    if isinstance(terms, str):
        terms = (terms,)
    unknown = [t for t in terms if t not in table.SCORE_TERMS]
    if unknown:
        raise ValueError(f"terms: expected names from {', '.join(table.SCORE_TERMS)}, got {', '.join(map(repr, unknown))}")
    if device_type != "cuda":
        return []
    return [f"{term}: the CUDA kernels do not take it yet" for term in terms
            if term not in table.CUDA_SCORE_TERMS]


def supported(device_type, dtype, head_dim: int, block_size: int, *,
              capability: tuple[int, int] | None = None, terms=()) -> list[str]:
    """The reasons the kernels cannot run a case; an empty list when they can. On CUDA,
    sa.sparse_attention runs a case with reasons in block-gathered torch ops instead
    (sparse_attention.gathered: the same result, slower), saying so once.

    Args:
        device_type: "cpu" or "cuda" (or a torch.device).
        dtype: of q, k, v (a torch.dtype or its name).
        head_dim: D of q, k and v.
        block_size: tokens per layout block.
        capability: a CUDA GPU's compute capability, e.g. (8, 6). Default: the current
            device's when a GPU is visible, else the architecture is not checked.
        terms: score terms the call uses (names from kernel_table.SCORE_TERMS: "sinks",
            "alibi_slopes", "softcap", "position_bias", "dropout").

    >>> sa.supported("cpu", torch.bfloat16, 64, 64)
    []

    On Hopper GPUs opt-in kernels exist for some of these cases; see
    sparse_attention.support.hopper_kernels.
    """
    device_type = _device_type(device_type)
    dtype = _dtype_name(dtype)
    head_dim, block_size = _check_int("head_dim", head_dim), _check_int("block_size", block_size)
    term_reasons = _term_reasons(device_type, terms)
    if device_type == "cuda":
        if not built_with_cuda():
            return [NO_CUDA_BUILD]
        if capability is None and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
    return list(_reasons(device_type, dtype, head_dim, block_size,
                         None if capability is None else tuple(capability))) + term_reasons


def hopper_kernels(dtype, head_dim: int, block_size: int, *,
                   capability: tuple[int, int] | None = None) -> str:
    """Whether a CUDA call (forward and backward) can take the Hopper kernels
    (kernel_table.CUDA_HOPPER_*), which are opt-in: "opt-in" when the case and GPU fit them and
    the environment variable is not set, "on" when it is, else the reason they do not apply.
    The mma.sync kernels run otherwise (and where a call passes cuda_kernels="mma").

    >>> sa.support.hopper_kernels(torch.bfloat16, 128, 128, capability=(9, 0))
    "opt-in: set SPARSE_ATTENTION_HOPPER_KERNELS=1 or pass cuda_kernels='hopper'"
    """
    dtype = _dtype_name(dtype)
    head_dim, block_size = _check_int("head_dim", head_dim), _check_int("block_size", block_size)
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    if dtype not in table.CUDA_DTYPES:
        return f"not for dtype {dtype}"
    kernel_head_dim = table.cuda_kernel_head_dim(head_dim) if head_dim >= 1 else None
    if kernel_head_dim not in table.CUDA_HOPPER_HEAD_DIMS or block_size not in table.CUDA_HOPPER_BLOCK_SIZES:
        return (f"not for head_dim {head_dim}, block_size {block_size} (it takes head dims "
                f"{', '.join(map(str, table.CUDA_HOPPER_HEAD_DIMS))} at block size "
                f"{', '.join(map(str, table.CUDA_HOPPER_BLOCK_SIZES))})")
    if capability is not None and tuple(capability) != table.CUDA_HOPPER_CAPABILITY:
        return "not for compute capability {}.{} (9.0 only)".format(*capability)
    if os.environ.get(table.CUDA_HOPPER_ENV) == "1":
        return "on"
    return f"opt-in: set {table.CUDA_HOPPER_ENV}=1 or pass cuda_kernels='hopper'"


@functools.lru_cache(maxsize=256)
def _reasons(device_type: str, dtype: str, head_dim: int, block_size: int, capability) -> tuple:
    # Cached: sa.sparse_attention asks on every CUDA call.
    if device_type == "cpu":
        return tuple(_cpu_reasons(dtype, head_dim, block_size))
    if device_type == "cuda":
        return tuple(_cuda_reasons(dtype, head_dim, block_size, capability))
    if device_type == "meta":
        return ()
    return (f"device {device_type}: sparse_attention has kernels for cpu and cuda only",)
