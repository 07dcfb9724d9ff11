"""Drop-in attention modules: SparseMultiheadAttention (torch.nn.MultiheadAttention's
interface) and SparseSelfAttention (DeepSpeed's), both dispatching through AttentionDispatch."""

from sparse_attention.nn.dispatch import SDPA_MAX_LEN, AttentionDispatch
from sparse_attention.nn.multihead import SparseMultiheadAttention
from sparse_attention.nn.self_attention import SparseSelfAttention

__all__ = ["SDPA_MAX_LEN", "AttentionDispatch", "SparseMultiheadAttention", "SparseSelfAttention"]
