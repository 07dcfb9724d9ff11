"""SparseMultiheadAttention: torch.nn.MultiheadAttention with a sparse attention pattern."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sparse_attention.nn.dispatch import SDPA_MAX_LEN, AttentionDispatch, check_dropout, check_pattern
from sparse_attention.nn.masks import check_causal_mask, padding_from_mask
from sparse_attention.patterns.base import Pattern


def _no_op(module, args) -> None:
    """A forward pre-hook that does nothing: nn.TransformerEncoderLayer skips its inference
    fast path (dense attention computed from self_attn's weights, without calling it) when a
    submodule has hooks."""


class SparseMultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention follows `pattern`.

    Same constructor, parameters (so an nn.MultiheadAttention state_dict loads), initialisation
    and forward signature; with a dense pattern it computes the same output. Attention runs
    through an AttentionDispatch (see sparse_attention.nn.dispatch): short sequences and
    complete layouts go to SDPA, the rest to the sparse kernels.

    Differences, each raising a clear error rather than computing something else:
    - need_weights must be False (the default here; the weights are never formed);
    - attn_mask may only be the causal mask (bool, True above the diagonal, or float -inf
      above it) or be replaced by is_causal=True; other structures belong in the pattern;
    - float key padding masks must hold 0 (keep) or -inf / large negatives (ignore);
    - add_bias_kv and add_zero_attn are not supported.

    Attention dropout (`dropout`, in training) applies on both paths: SDPA's on the SDPA path,
    the kernels' on the sparse path (its bits drawn from torch's default generator).

    Args (beyond nn.MultiheadAttention's):
        pattern: a Pattern (or DeepSpeed config) for num_heads heads.
        sdpa_max_len, sdpa_min_coverage: when SDPA is used instead (see AttentionDispatch).

    As nn.TransformerEncoderLayer's self_attn it is always called: a no-op forward pre-hook
    keeps the layer's inference fast path (dense attention from the weights) out.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, pattern: Pattern, sdpa_max_len: int = SDPA_MAX_LEN,
                 sdpa_min_coverage: float | None = None):
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv, add_zero_attn: not supported by SparseMultiheadAttention")
        check_dropout("dropout", dropout)
        super().__init__(embed_dim, num_heads, dropout, bias, False, False, kdim, vdim,
                         batch_first, device, dtype)
        self.dispatch = AttentionDispatch(
            check_pattern(pattern, num_heads), sdpa_max_len=sdpa_max_len,
            sdpa_min_coverage=sdpa_min_coverage, owner=type(self).__name__,
        )
        self.register_forward_pre_hook(_no_op)

    @property
    def pattern(self) -> Pattern:
        return self.dispatch.pattern

    @property
    def attention_path(self) -> str | None:
        """'sparse' or 'sdpa': the path the last call took (None before the first)."""
        return self.dispatch.last_path

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False, *, layout=None, cu_seqlens=None,
                cu_seqlens_k=None):
        """As nn.MultiheadAttention.forward; returns (attn_output, None). layout: a layout for
        this call (a TensorLayout made per input, or a BlockLayout) instead of the pattern's.
        cu_seqlens (cu_seqlens_k for keys laid out otherwise): packed documents, int32/int64
        offsets over the batch's queries (keys) taken one batch entry after another, as
        FlashAttention's varlen; every document is attended alone (see sparse_attention)."""
        if need_weights:
            raise ValueError(
                "need_weights: the sparse kernels never form the attention weights; pass "
                "need_weights=False"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, layout,
                           (cu_seqlens, cu_seqlens_k))  # [L, B, E]
        if self.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(1)), None

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, layout, documents):
        """Sequence-first [L, B, E] in and out."""
        q_len, batch, _ = query.shape
        k_len = key.shape[0]
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).reshape(x.shape[0], batch, self.num_heads, self.head_dim)
                   .permute(1, 2, 0, 3) for x, w, b in zip((query, key, value), weights, biases))
        if key_padding_mask is not None:
            key_padding_mask = padding_from_mask("key_padding_mask", key_padding_mask, "bool",
                                                 batch, k_len).to(q.device)
        causal = bool(is_causal)
        if attn_mask is not None and not causal:
            check_causal_mask("attn_mask", attn_mask, "bool", q_len, k_len)
            causal = True
        out = self.dispatch(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                            dropout_p=self.dropout if self.training else 0.0, layout=layout,
                            cu_seqlens=documents[0], cu_seqlens_k=documents[1])
        out = out.permute(2, 0, 1, 3).reshape(q_len, batch, self.embed_dim)
        return self.out_proj(out)
