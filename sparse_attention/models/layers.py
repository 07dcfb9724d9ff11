"""The layers of the Sparse Transformer: rotary positions, attention, MLP, pre-norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attention.models.config import SparseTransformerConfig
from sparse_attention.models.documents import Documents
from sparse_attention.models.kv_cache import KVCache
from sparse_attention.nn.dispatch import AttentionDispatch
from sparse_attention.patterns.base import Pattern


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on [B, H, N, D] queries or keys, half-split
    form: dims i and i + D/2 rotate together by position * base^(-2i/D)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Recomputed at construction, so not saved with the weights.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x's tokens are at positions offset, offset + 1, ..., or at `positions` [B, N]
        (packed documents: each counts from its own start)."""
        if positions is not None:
            cos, sin = (t[positions].unsqueeze(1).to(x.dtype) for t in (self.cos, self.sin))
        else:
            n = x.shape[-2]
            cos, sin = (t[offset:offset + n].to(x.dtype) for t in (self.cos, self.sin))
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with one pattern, through AttentionDispatch."""

    def __init__(self, config: SparseTransformerConfig, pattern: Pattern, causal: bool,
                 rotary: Rotary | None, index: int):
        super().__init__()
        self.index = index
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.causal = causal
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.rotary = rotary  # one module shared by every layer (its buffers are not saved)
        self.dispatch = AttentionDispatch(pattern, sdpa_max_len=config.sdpa_max_len,
                                          sdpa_min_coverage=config.sdpa_min_coverage,
                                          owner=f"layer {index}")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layout=None, documents: Documents | None = None
                ) -> torch.Tensor:
        """x [B, N, d_model]; with a cache, x holds the tokens that follow the cached ones.
        layout: this call's layout instead of the pattern's (see AttentionDispatch).
        documents: packed documents, each attended alone with its own positions."""
        batch, n, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = 0 if cache is None else cache.length(self.index)
        positions = None if documents is None else documents.positions
        if self.rotary is not None:
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        if cache is not None:
            k, v = cache.append(self.index, k, v)
        out = self.dispatch(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                            dropout_p=self.attention_dropout if self.training else 0.0,
                            layout=layout,
                            cu_seqlens=None if documents is None else documents.cu_seqlens)
        return self.out(out.transpose(1, 2).reshape(batch, n, d_model))


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x)))."""

    def __init__(self, config: SparseTransformerConfig, pattern: Pattern, causal: bool,
                 rotary: Rotary | None, index: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config, pattern, causal, rotary, index)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp_in = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.mlp_out = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The layers that write into the residual stream (scaled at initialisation)."""
        return self.attn.out, self.mlp_out

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layout=None, documents: Documents | None = None
                ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), key_padding_mask, cache, layout,
                                       documents))
        return x + self.dropout(self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)))))
