"""What each kernel family is compiled for: the one place the supported set is written.

csrc/cuda/generate_instantiations.py reads this file (by path, without importing the package)
to write the CUDA instantiations and csrc/cuda/supported_cases.h, whose static_asserts check
the shared-memory sizes below against the kernels' own traits at compile time.
`sparse_attention.supported()` answers from the same tables. Plain Python only: no torch.
"""

from __future__ import annotations

# --- CPU: templated on the element type, any head dim, block sizes as the layout allows.
CPU_DTYPES = ("float32", "float64", "float16", "bfloat16")
CPU_MAX_HEAD_DIM = 256
CPU_BLOCK_SIZES = (16, 32, 64, 128, 256)

# --- CUDA (mma.sync tensor-core kernels): one instantiation per (pass, dtype, head dim).
CUDA_DTYPES = {"float16": "kHalf", "bfloat16": "kBFloat16"}  # torch name -> C++ DType tag
CUDA_DTYPE_FILE_NAMES = {"float16": "fp16", "bfloat16": "bf16"}
CUDA_HEAD_DIMS = (32, 64, 128)  # compiled; a smaller D runs zero-padded to the next of these
CUDA_BLOCK_SIZES = (64, 128)
CUDA_PASSES = ("forward", "backward")
CUDA_MIN_CAPABILITY = (8, 0)  # mma.sync on bf16 and cp.async

# --- CUDA on Hopper (csrc/cuda/hopper): forward and backward with TMA loads, wgmma and warp
# specialization, built as sm_90a code (with the nvidia-cutlass headers; setup.py). Opt-in
# until they have passed on a GPU: they run only where CUDA_HOPPER_ENV is "1" or the call says
# cuda_kernels="hopper", on compute capability 9.0, for these cases; every other call runs on
# the kernels above.
CUDA_HOPPER_ENV = "SPARSE_ATTENTION_HOPPER_KERNELS"
CUDA_KERNEL_CHOICES = ("auto", "hopper", "mma")  # the ops' cuda_kernels (csrc/input_checks.h)
CUDA_HOPPER_CAPABILITY = (9, 0)
CUDA_HOPPER_PASSES = ("forward", "backward")
CUDA_HOPPER_HEAD_DIMS = (64, 128)
CUDA_HOPPER_BLOCK_SIZES = (128,)
CUDA_HOPPER_DEFAULT = False  # not yet run on a GPU

# --- Score terms (sparse_attention.score_terms): which terms each family computes. A CUDA call
# with a term its kernels do not take runs the dense reference in float32 instead (said once).
SCORE_TERMS = ("sinks", "alibi_slopes", "softcap", "position_bias", "dropout")
CPU_SCORE_TERMS = SCORE_TERMS
CUDA_SCORE_TERMS = ()
CUDA_HOPPER_SCORE_TERMS = ()

# Tile shape of the CUDA kernels (csrc/cuda/kernel_traits.h has the same constants; the
# generated header asserts that the sizes computed here equal the traits').
CUDA_KEY_TILE = 64
CUDA_QUERY_TILE = 64
CUDA_ELEMENT_BYTES = 2

# Shared memory a thread block may opt into, per compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"); others fall back to the smallest.
CUDA_SHARED_BYTES_BY_CAPABILITY = {
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}
CUDA_DEFAULT_SHARED_BYTES = 99 * 1024


def cuda_kernel_head_dim(head_dim: int) -> int | None:
    """The compiled head dim that runs a CUDA call of head dim D: D itself, else the next
    compiled width (q, k, v are zero-padded to it: zero columns add nothing to q k^T and give
    zero output columns, which are cut off); None above the widest."""
    return next((width for width in CUDA_HEAD_DIMS if width >= head_dim), None)


CUDA_KERNELS = ("forward", "grad_q", "grad_kv", "grad_kv_before_dq_pass")


def cuda_shared_bytes(kernel: str, head_dim: int, block_size: int) -> int:
    """Dynamic shared memory of one CUDA kernel launch in bytes: "forward", "grad_q" (the dQ
    pass), "grad_kv" (dK, dV and the dQ atomics, which stage dS^T) or
    "grad_kv_before_dq_pass" (the same kernel before a dQ pass: no staging)."""
    q_tile = block_size * head_dim
    kv_tile = CUDA_KEY_TILE * head_dim
    if kernel == "forward":
        return (q_tile + 4 * kv_tile) * CUDA_ELEMENT_BYTES
    if kernel == "grad_q":
        return (2 * q_tile + 4 * kv_tile) * CUDA_ELEMENT_BYTES
    if kernel in ("grad_kv", "grad_kv_before_dq_pass"):
        query_tile = CUDA_QUERY_TILE * head_dim
        before_pass = (2 * kv_tile + 4 * query_tile) * CUDA_ELEMENT_BYTES + 4 * CUDA_QUERY_TILE * 4
        if kernel == "grad_kv_before_dq_pass":
            return before_pass
        return before_pass + CUDA_KEY_TILE * CUDA_QUERY_TILE * CUDA_ELEMENT_BYTES
    raise ValueError(f"kernel: expected one of {', '.join(CUDA_KERNELS)}, got {kernel!r}")


def cuda_backward_takes_dq_pass(head_dim: int, block_size: int, limit: int) -> bool:
    """Whether the mma.sync backward computes dQ in its own pass on a GPU of `limit` bytes of
    shared memory per thread block because the dQ atomics' dK/dV kernel does not fit there
    (csrc/cuda/attention_cuda.cpp decides the same; deterministic calls always take the pass)."""
    return cuda_shared_bytes("grad_kv", head_dim, block_size) > limit


def cuda_shared_limit(capability: tuple[int, int]) -> int:
    return CUDA_SHARED_BYTES_BY_CAPABILITY.get(tuple(capability), CUDA_DEFAULT_SHARED_BYTES)
