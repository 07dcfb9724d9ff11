"""SparseSelfAttention: DeepSpeed's module of that name, on this package's kernels."""

from __future__ import annotations

import torch
from torch import nn

from sparse_attention.nn.dispatch import SDPA_MAX_LEN, AttentionDispatch, check_pattern
from sparse_attention.nn.masks import check_causal_mask, padding_from_mask
from sparse_attention.patterns.base import Pattern

_MASK_MODES = ("add", "mul")


class SparseSelfAttention(nn.Module):
    """deepspeed.ops.sparse_attention.SparseSelfAttention: same constructor and forward, so
    switching is a change of import.

    Args:
        sparsity_config: a DeepSpeed-style config (sa.FixedSparsityConfig, ...) or any Pattern.
        key_padding_mask_mode: 'add' (0 keep, -inf or <= -1e4 ignore) or 'mul' (1 keep, 0 ignore).
        attn_mask_mode: the same for attn_mask.
        max_seq_length: accepted for compatibility; no length limit applies here (layouts are
            built for each length met).
        sdpa_max_len, sdpa_min_coverage: when SDPA is used instead (see AttentionDispatch).

    forward(query, key, value, rpe=None, key_padding_mask=None, attn_mask=None): q, k, v
    [B, H, N, D] (key may also come transposed, [B, H, D, N], as DeepSpeed allowed); returns
    [B, H, N, D]. key_padding_mask [B, N] (or [B, 1, 1, N]); attn_mask [N, N] may only be the
    causal mask (use a unidirectional config instead); rpe (relative position scores) is not
    supported. Unlike DeepSpeed: any dtype the kernels take (not only fp16), any N, CPU too.
    """

    def __init__(self, sparsity_config: Pattern, key_padding_mask_mode: str = "add",
                 attn_mask_mode: str = "mul", max_seq_length: int = 2048, *,
                 sdpa_max_len: int = SDPA_MAX_LEN, sdpa_min_coverage: float | None = None):
        super().__init__()
        for name, mode in (("key_padding_mask_mode", key_padding_mask_mode),
                           ("attn_mask_mode", attn_mask_mode)):
            if mode not in _MASK_MODES:
                raise ValueError(f"{name}: expected 'add' or 'mul', got {mode!r}")
        self.sparsity_config = check_pattern(sparsity_config)
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self.max_seq_length = max_seq_length
        self.dispatch = AttentionDispatch(self.sparsity_config, sdpa_max_len=sdpa_max_len,
                                          sdpa_min_coverage=sdpa_min_coverage,
                                          owner=type(self).__name__)

    @property
    def attention_path(self) -> str | None:
        """'sparse' or 'sdpa': the path the last call took (None before the first)."""
        return self.dispatch.last_path

    def forward(self, query, key, value, rpe=None, key_padding_mask=None, attn_mask=None, *,
                layout=None, cu_seqlens=None, cu_seqlens_k=None):
        """DeepSpeed's forward. layout: a layout for this call (a TensorLayout made per input,
        or a BlockLayout) instead of the config's. cu_seqlens (cu_seqlens_k): packed
        documents over the batch's rows taken one after another (see AttentionDispatch)."""
        if rpe is not None:
            raise ValueError("rpe: relative position embeddings are not supported by the sparse kernels")
        if (key.dim() == 4 and value.dim() == 4 and key.shape[-2] != value.shape[-2]
                and key.shape[-1] == value.shape[-2]):
            key = key.transpose(-1, -2)  # DeepSpeed accepted keys already transposed
        if not isinstance(query, torch.Tensor) or query.dim() != 4:
            raise ValueError("query: expected a [batch, heads, seq_len, head_dim] tensor")
        batch, _, q_len, _ = query.shape
        k_len = key.shape[-2]
        if key_padding_mask is not None:
            key_padding_mask = padding_from_mask("key_padding_mask", key_padding_mask,
                                                 self.key_padding_mask_mode, batch, k_len
                                                 ).to(query.device)
        causal = False
        if attn_mask is not None:
            check_causal_mask("attn_mask", attn_mask, self.attn_mask_mode, q_len, k_len)
            causal = True
        return self.dispatch(query, key, value, causal=causal, key_padding_mask=key_padding_mask,
                             layout=layout, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
