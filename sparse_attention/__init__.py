"""Block-sparse attention for PyTorch: CPU and CUDA kernels behind one torch op."""

from sparse_attention._extension import built_with_cuda, cpu_capability
from sparse_attention.attention import sparse_attention
from sparse_attention.layout import BlockLayout, BlockLists
from sparse_attention import reference

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "BlockLists",
    "built_with_cuda",
    "cpu_capability",
    "reference",
    "sparse_attention",
    "__version__",
]
