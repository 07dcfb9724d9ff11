"""Block-sparse attention for PyTorch: CPU and CUDA kernels behind one torch op."""

from sparse_attention._extension import built_with_cuda, cpu_capability
from sparse_attention.attention import sparse_attention
from sparse_attention.layout import BlockLayout, BlockLists
from sparse_attention.patterns import (
    PATTERN_NAMES, BigBird, BigBirdSparsityConfig, BSLongformerSparsityConfig, Custom, Dense,
    DenseSparsityConfig, Dilated, Fixed, FixedSparsityConfig, Global, Intersection, Local,
    LocalSlidingWindowSparsityConfig, Longformer, Pattern, Random, SparsityConfig, Strided,
    Union, VariableSparsityConfig, from_name, stride_for,
)
from sparse_attention.score_terms import PositionBias
from sparse_attention.show import show, show_text
from sparse_attention.support import supported
from sparse_attention.tensor_layout import TensorLayout
from sparse_attention.selection import select_blocks
from sparse_attention.block_mass import block_attention_mass
from sparse_attention import reference

__version__ = "0.1.0"

__all__ = [
    "BSLongformerSparsityConfig",
    "BigBird",
    "BigBirdSparsityConfig",
    "BlockLayout",
    "BlockLists",
    "Custom",
    "Dense",
    "DenseSparsityConfig",
    "Dilated",
    "Fixed",
    "FixedSparsityConfig",
    "Global",
    "Intersection",
    "Local",
    "LocalSlidingWindowSparsityConfig",
    "Longformer",
    "PATTERN_NAMES",
    "Pattern",
    "PositionBias",
    "Random",
    "SparsityConfig",
    "Strided",
    "TensorLayout",
    "Union",
    "VariableSparsityConfig",
    "block_attention_mass",
    "built_with_cuda",
    "cpu_capability",
    "from_name",
    "reference",
    "select_blocks",
    "show",
    "show_text",
    "sparse_attention",
    "stride_for",
    "supported",
    "__version__",
]
