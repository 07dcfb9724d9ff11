"""The Sparse Transformer models: SparseTransformerLM (decoder-only language model) and
SparseTransformerClassifier (encoder with pooling), with their configs."""

from sparse_attention.models.classifier import SparseTransformerClassifier
from sparse_attention.models.config import SparseClassifierConfig, SparseTransformerConfig
from sparse_attention.models.kv_cache import KVCache
from sparse_attention.models.lm import SparseTransformerLM
from sparse_attention.models.output import ModelOutput
from sparse_attention.models.trunk import SparseTransformer
from sparse_attention.patterns.full_sequence_rows import FullSequenceRows  # its former home

__all__ = ["FullSequenceRows", "KVCache", "ModelOutput", "SparseClassifierConfig", "SparseTransformer",
           "SparseTransformerClassifier", "SparseTransformerConfig", "SparseTransformerLM"]
