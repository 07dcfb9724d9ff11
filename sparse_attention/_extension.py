"""Loads the compiled extension, which registers torch.ops.sparse_attention.*."""

from __future__ import annotations

import torch  # loads libtorch, which the extension links against

try:
    from sparse_attention import _C
except ModuleNotFoundError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "sparse_attention._C is not built. Install the package with "
        "`pip install --no-build-isolation .` (see README.md)."
    ) from error

ops = torch.ops.sparse_attention


def cpu_capability() -> str:
    """Instruction set the CPU kernels run with: "AVX512", "AVX2" or "DEFAULT"."""
    return _C.cpu_capability()


def built_with_cuda() -> bool:
    """Whether the extension was compiled with nvcc against a CUDA build of torch."""
    return bool(_C.with_cuda)
