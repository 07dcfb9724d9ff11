"""Autograd and fake (meta) kernels of torch.ops.sparse_attention.forward/backward.

The C++ extension defines the schemas and device kernels; this file makes the ops
differentiable and traceable by torch.compile.
"""

from __future__ import annotations

import torch

from sparse_attention._extension import ops


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in the accumulation type: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("sparse_attention::forward")
def _forward_fake(q, k, v, row_offsets, row_indices, row_num_full, col_offsets, col_indices,
                  col_num_full, key_padding_mask, block_size, scale, window_left, window_right,
                  deterministic=False):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse


@torch.library.register_fake("sparse_attention::backward")
def _backward_fake(grad_out, grad_lse, q, k, v, out, lse, row_offsets, row_indices,
                   row_num_full, col_offsets, col_indices, col_num_full, key_padding_mask,
                   block_size, scale, window_left, window_right, deterministic=False):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return like(q), like(k), like(v)


_LIST_ARGS = 6  # row and column CSR tensors between v and key_padding_mask


def _setup_context(ctx, inputs, output):
    q, k, v, *lists = inputs[: 3 + _LIST_ARGS]
    # key_padding_mask, block_size, scale, window_left, window_right[, deterministic]
    key_padding_mask, *attrs = inputs[3 + _LIST_ARGS :]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *lists, key_padding_mask)
    ctx.attrs = tuple(attrs)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    lists, key_padding_mask = rest[:_LIST_ARGS], rest[_LIST_ARGS]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = ops.backward(
        grad_out, grad_lse, q, k, v, out, lse, *lists, key_padding_mask, *ctx.attrs
    )
    return (grad_q, grad_k, grad_v) + (None,) * (_LIST_ARGS + 1 + len(ctx.attrs))


torch.library.register_autograd("sparse_attention::forward", _backward, setup_context=_setup_context)
