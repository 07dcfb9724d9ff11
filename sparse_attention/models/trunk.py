"""SparseTransformer: embeddings, positions, the blocks and the final norm, shared by the
language model and the classifier."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparse_attention.models.config import SparseTransformerConfig
from sparse_attention.models.documents import documents_of
from sparse_attention.models.kv_cache import KVCache
from sparse_attention.models.layers import Block, Rotary


class SparseTransformer(nn.Module):
    """Token ids [B, N] -> hidden states [B, N, d_model].

    Initialisation follows Child et al. 2019 (and GPT-2): weights normal(0, init_std), the
    projections that write into the residual stream scaled by 1 / sqrt(2 * num_layers), so
    the residual stream's variance does not grow with depth.
    """

    def __init__(self, config: SparseTransformerConfig, causal: bool):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = (nn.Embedding(config.max_seq_len, config.d_model)
                          if config.positions == "learned" else None)
        rotary = Rotary(config.head_dim, config.max_seq_len) if config.positions == "rotary" else None
        self.blocks = nn.ModuleList(
            Block(config, pattern, causal, rotary, index=i)
            for i, pattern in enumerate(config.layer_patterns())
        )
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = config.gradient_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in block.residual_projections():
                nn.init.normal_(projection.weight, std=std / math.sqrt(2 * self.config.num_layers))

    def check_input_ids(self, input_ids, cached: int = 0, any_length: bool = False) -> None:
        """input_ids: int [B, N], with N + cached <= max_seq_len unless any_length."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids: expected an int64 (or int32) tensor [batch, seq_len]")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected a non-empty [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}")
        if not any_length and cached + input_ids.shape[1] > self.config.max_seq_len:
            after = f" after {cached} cached" if cached else ""
            raise ValueError(
                f"input_ids: {input_ids.shape[1]} tokens{after} exceed max_seq_len={self.config.max_seq_len}"
            )

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layout=None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of input_ids; with a cache, of the tokens that follow the cached ones
        (which it then holds too). layout: a layout for this call instead of the patterns'
        (a TensorLayout made per input, or a BlockLayout), or a list of one per layer.
        cu_seqlens: packed documents, int32/int64 [documents + 1] offsets over the B * N
        tokens taken row after row (FlashAttention's varlen); every document is attended
        alone and its positions start at 0, as if it were run on its own."""
        offset = 0 if cache is None else cache.length()
        # Packed documents: max_seq_len bounds every document (its positions), not the row.
        self.check_input_ids(input_ids, cached=offset, any_length=cu_seqlens is not None)
        if cache is not None:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask: not supported with a cache")
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens: not supported with a cache (decode each document "
                                 "in a row of its own)")
        documents = None
        if cu_seqlens is not None:
            documents = documents_of(cu_seqlens, input_ids, self.config.max_seq_len)
        x = self.embed(input_ids)
        if self.positions is not None:
            positions = (documents.positions if documents is not None else
                         torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device))
            x = x + self.positions(positions)
        x = self.dropout(x)
        # Checkpointing would run a block twice, and append to the cache twice.
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        layouts = _per_layer("layout", layout, len(self.blocks))
        for block, block_layout in zip(self.blocks, layouts):
            if checkpointed:
                x = checkpoint(block, x, key_padding_mask, None, block_layout, documents,
                               use_reentrant=False)
            else:
                x = block(x, key_padding_mask, cache, block_layout, documents)
        return self.norm(x)


def _per_layer(name: str, value, layers: int) -> list:
    """One value per layer from a single value or a list/tuple of one per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise ValueError(f"{name}: expected one per layer ({layers}), got {len(value)}")
        return list(value)
    return [value] * layers
