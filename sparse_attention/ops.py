"""Typed wrappers of torch.ops.sparse_attention.*, with their autograd and fake (meta) kernels.

The C++ extension defines the schemas and device kernels. Python code calls the ops through
`forward`, `backward` and `build_block_lists` here, by name; the only place that knows the
ops' positional order is the schema itself (read back below for autograd).
"""

from __future__ import annotations

import torch

from sparse_attention._extension import ops as _ops
from sparse_attention.score_terms import NO_TERMS, Terms
from sparse_attention.window import Window

LIST_NAMES = ("row_offsets", "row_indices", "row_num_full", "col_offsets", "col_indices",
              "col_num_full")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in the accumulation type: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_args(lists, key_padding_mask, cu_seqlens, block_size: int, scale: float,
                 window: Window, deterministic: bool, cuda_kernels: str) -> dict:
    left, right = Window.of(window).kernel_bounds()
    cu_q, cu_k = cu_seqlens if cu_seqlens is not None else (None, None)
    return dict(zip(LIST_NAMES, lists), key_padding_mask=key_padding_mask, cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k, block_size=int(block_size), scale=float(scale),
                window_left=left, window_right=right, deterministic=bool(deterministic),
                cuda_kernels=str(cuda_kernels))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists, *,
            key_padding_mask: torch.Tensor | None, block_size: int, scale: float,
            window: Window = Window(), deterministic: bool = False,
            cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
            cuda_kernels: str = "auto", terms: Terms = NO_TERMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the block-sparse op over the six block lists (a BlockLists).
    cu_seqlens: (query starts, key starts) of packed documents, with lists per document.
    terms: the score terms (sparse_attention.score_terms)."""
    return _ops.forward(q=q, k=k, v=v, **_kernel_args(lists, key_padding_mask, cu_seqlens,
                                                      block_size, scale, window, deterministic,
                                                      cuda_kernels),
                        **terms.op_args(q.shape[2], k.shape[2], q.device))


def backward(grad_out, grad_lse, q, k, v, out, lse, lists, *, key_padding_mask, block_size: int,
             scale: float, window: Window = Window(), deterministic: bool = False,
             cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
             cuda_kernels: str = "auto", terms: Terms = NO_TERMS):
    """(grad_q, grad_k, grad_v, grad_sinks, grad_alibi_slopes, grad_position_bias) of
    `forward`; the gradient of a term the call did not have is an empty tensor."""
    return _ops.backward(grad_out=grad_out, grad_lse=grad_lse, q=q, k=k, v=v, out=out, lse=lse,
                         **_kernel_args(lists, key_padding_mask, cu_seqlens, block_size, scale,
                                        window, deterministic, cuda_kernels),
                         **terms.op_args(q.shape[2], k.shape[2], q.device))


def block_mass(q, k, lse, lists, *, key_padding_mask, block_size: int, scale: float,
               window: Window = Window()) -> torch.Tensor:
    """float32 [B, H, q_blocks, k_blocks]: sum of exp(q k^T * scale - lse) over every block
    pair of the row lists (CPU kernels)."""
    left, right = Window.of(window).kernel_bounds()
    rows = dict(zip(LIST_NAMES[:3], lists[:3]))  # a BlockLists or a plain tuple of the six
    return _ops.block_mass(q=q, k=k, lse=lse, **rows, key_padding_mask=key_padding_mask,
                           block_size=int(block_size), scale=float(scale), window_left=left,
                           window_right=right)


def build_block_lists(block_mask: torch.Tensor, q_len: int, k_len: int, block_size: int,
                      window: Window = Window()) -> tuple[torch.Tensor, ...]:
    """The six CSR block lists of a bool block mask [heads, q_blocks, k_blocks] (CPU)."""
    left, right = Window.of(window).kernel_bounds()
    return _ops.build_block_lists(block_mask=block_mask, q_len=q_len, k_len=k_len,
                                  block_size=block_size, window_left=left, window_right=right)


def block_kinds(q_len: int, k_len: int, block_size: int, window: Window = Window()) -> torch.Tensor:
    """uint8 [q_blocks, k_blocks] on the CPU: 0 = no element visible, 1 = full (no element
    mask needed), 2 = partial, under the element rules of these lengths and window."""
    left, right = Window.of(window).kernel_bounds()
    return _ops.block_kinds(q_len=q_len, k_len=k_len, block_size=block_size, window_left=left,
                            window_right=right)


@torch.library.register_fake("sparse_attention::forward")
def _forward_fake(q, k, v, *args, **kwargs):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse


@torch.library.register_fake("sparse_attention::block_mass")
def _block_mass_fake(q, k, lse, row_offsets, row_indices, row_num_full, key_padding_mask,
                     block_size, *args):
    blocks = (-(-q.shape[2] // block_size), -(-k.shape[2] // block_size))
    return torch.empty(*q.shape[:2], *blocks, dtype=torch.float32, device=q.device)


_TERM_GRADS = ("sinks", "alibi_slopes", "position_bias")  # after grad_q, grad_k, grad_v


_BACKWARD_ARGS = tuple(a.name for a in _ops.backward.default._schema.arguments)


@torch.library.register_fake("sparse_attention::backward")
def _backward_fake(*args, **kwargs):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    given = {**dict(zip(_BACKWARD_ARGS, args)), **kwargs}
    q = given["q"]
    terms = tuple(like(given[name]) if given.get(name) is not None
                  else torch.empty(0, dtype=torch.float32, device=q.device) for name in _TERM_GRADS)
    return (like(q), like(given["k"]), like(given["v"])) + terms


_FORWARD_ARGS = tuple(a.name for a in _ops.forward.default._schema.arguments)
_SAVED = ("q", "k", "v", *LIST_NAMES, "key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "sinks",
          "alibi_slopes", "position_bias", "position_buckets")
_DIFFERENTIABLE = ("q", "k", "v", *_TERM_GRADS)  # in the order the backward op returns them


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(*(args.get(name) for name in _SAVED), out, lse)
    ctx.attrs = {name: args[name] for name in _FORWARD_ARGS if name in args and name not in _SAVED}
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    *saved, out, lse = ctx.saved_tensors
    args = dict(zip(_SAVED, saved))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = dict(zip(_DIFFERENTIABLE, _ops.backward(grad_out=grad_out, grad_lse=grad_lse, out=out,
                                                    lse=lse, **args, **ctx.attrs)))
    return tuple(grads[name] if name in grads and args.get(name) is not None else None
                 for name in _FORWARD_ARGS[:ctx.num_inputs])


torch.library.register_autograd("sparse_attention::forward", _backward, setup_context=_setup_context)
