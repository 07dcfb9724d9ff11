"""Attention patterns: objects that build a BlockLayout for any lengths and head count.

`sparse_attention(q, k, v, pattern, causal=...)` accepts any of them where it accepts a
BlockLayout. `from_name` builds them by name with length-aware defaults. The DeepSpeed-style
sparsity configs (deepspeed.py) are patterns too.
"""

from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.combinations import BigBird, Longformer
from sparse_attention.patterns.composite import Intersection, Union
from sparse_attention.patterns.custom import Custom
from sparse_attention.patterns.deepspeed import (
    BigBirdSparsityConfig, BSLongformerSparsityConfig, DenseSparsityConfig, FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig, SparsityConfig, VariableSparsityConfig,
)
from sparse_attention.patterns.full_sequence_rows import FullSequenceRows
from sparse_attention.patterns.global_random import Global, Random
from sparse_attention.patterns.local import Dense, Dilated, Local
from sparse_attention.patterns.names import PATTERN_NAMES, from_name
from sparse_attention.patterns.sparse_transformer import Fixed, Strided, stride_for

__all__ = [
    "BSLongformerSparsityConfig", "BigBird", "BigBirdSparsityConfig", "Custom", "Dense",
    "DenseSparsityConfig", "Dilated", "Fixed", "FixedSparsityConfig", "FullSequenceRows",
    "Global", "Intersection",
    "Local", "LocalSlidingWindowSparsityConfig", "Longformer", "PATTERN_NAMES", "Pattern",
    "Random", "SparsityConfig", "Strided", "Union", "VariableSparsityConfig", "from_name",
    "stride_for",
]
