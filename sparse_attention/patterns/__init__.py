"""Attention patterns: objects that build a BlockLayout for any lengths and head count.

`sparse_attention(q, k, v, pattern, causal=...)` accepts any of them where it accepts a
BlockLayout. `from_name` builds them by name with length-aware defaults.
"""

from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.combinations import BigBird, Longformer
from sparse_attention.patterns.composite import Intersection, Union
from sparse_attention.patterns.custom import Custom
from sparse_attention.patterns.global_random import Global, Random
from sparse_attention.patterns.local import Dense, Dilated, Local
from sparse_attention.patterns.names import PATTERN_NAMES, from_name
from sparse_attention.patterns.sparse_transformer import Fixed, Strided, stride_for

__all__ = [
    "BigBird", "Custom", "Dense", "Dilated", "Fixed", "Global", "Intersection", "Local",
    "Longformer", "PATTERN_NAMES", "Pattern", "Random", "Strided", "Union", "from_name",
    "stride_for",
]
