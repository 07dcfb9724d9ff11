"""sparse_attention(): the public entry point, with its argument checks."""

from __future__ import annotations

import functools
import math
import operator
import warnings

import torch

from sparse_attention import ops, packing, score_terms, split_rows, support
from sparse_attention.compile_constants import eager_constant
from sparse_attention.kernel_table import CPU_DTYPES, CUDA_KERNEL_CHOICES, cuda_kernel_head_dim
from sparse_attention.layout import BlockLayout, BlockLists
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.grid import whole_block_pieces
from sparse_attention.support import supported
from sparse_attention.tensor_layout import TensorLayout
from sparse_attention.window import Window

SUPPORTED_DTYPES = tuple(getattr(torch, name) for name in CPU_DTYPES)


def _device_types_with_kernels() -> tuple[str, ...]:
    """Device types with a registered forward kernel ("meta": where torch.compile and
    opcheck trace shapes)."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    gpu = tuple(device for device, key in (("cuda", "CUDA"),)
                if has_kernel("sparse_attention::forward", key))
    return ("cpu", "meta") + gpu


SUPPORTED_DEVICE_TYPES = _device_types_with_kernels()


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(
            f"{name}: expected 4 dims [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}"
        )


def _transposed_hint(q: torch.Tensor, k: torch.Tensor) -> str:
    """A note for shape errors when q and k look like [B, N, H, D] (the layout of
    nn.MultiheadAttention's batch_first inputs and of many models' projections)."""
    if q.shape[1] > q.shape[2] and k.shape[1] > k.shape[2]:
        return (f"; q {tuple(q.shape)} and k {tuple(k.shape)} look transposed: the op takes "
                "[batch, heads, seq_len, head_dim] (pass q.transpose(1, 2), and the same for k, v)")
    return ""


def _call_head_dim(q: torch.Tensor, v: torch.Tensor) -> int:
    """The head dim the kernels run a call at before padding: the larger of D and Dv."""
    return max(q.shape[-1], v.shape[-1])


def _kernel_reasons(q: torch.Tensor, v: torch.Tensor, block_size: int, terms=()) -> tuple[str, ...]:
    """Why the device's kernels cannot run a call with these score terms (sa.supported); ()
    where they can."""
    if q.device.type != "cuda":
        return ()
    return tuple(supported(q.device, q.dtype, _call_head_dim(q, v), block_size, terms=terms,
                           capability=torch.cuda.get_device_capability(q.device)))


def _kernel_block_size(q: torch.Tensor, v: torch.Tensor, block_size: int) -> int:
    """The block size the device's kernels run a layout of `block_size` at: on CUDA
    support.cuda_run_block_size (a multiple of a compiled size runs as blocks of it), where none
    does and on the CPU the layout's own."""
    if q.device.type != "cuda":
        return block_size
    run = support.cuda_run_block_size(_call_head_dim(q, v), block_size,
                                      capability=torch.cuda.get_device_capability(q.device))
    return run or block_size


_GATHERED_WARNED: set[tuple[str, ...]] = set()


def _forward_for(q: torch.Tensor, v: torch.Tensor, block_size: int, cuda_kernels: str, terms=()):
    """ops.forward where the device's kernels take the call (zero-padded along D where they run
    it at a wider head dim); else the same call in block-gathered torch ops
    (sparse_attention.gathered), said once per set of reasons."""
    reasons = _kernel_reasons(q, v, block_size, terms)
    if not reasons:
        kernels = split_rows.forward if _splits_rows(q, terms) else ops.forward
        width = _kernel_head_dim(q.device.type, _call_head_dim(q, v))
        if width == q.shape[-1] == v.shape[-1]:
            return kernels
        return functools.partial(_zero_padded_forward, width=width, kernels=kernels)
    if cuda_kernels == "hopper":
        raise ValueError("cuda_kernels: 'hopper' cannot run this call: " + "; ".join(reasons))
    _say_gathered_once(reasons)
    return _gathered_forward


@torch.compiler.assume_constant_result
def _say_gathered_once(reasons: tuple[str, ...]) -> bool:
    # Run eagerly under torch.compile too (Dynamo does not trace warnings.warn): said when a
    # graph is traced, as in eager mode on the first call.
    if reasons in _GATHERED_WARNED:
        return False
    _GATHERED_WARNED.add(reasons)
    warnings.warn("; ".join(reasons) + ". sparse_attention runs such calls with block-gathered "
                  "torch ops (sparse_attention.gathered: the same result, memory and work "
                  "O(computed blocks), slower than the kernels).", stacklevel=5)
    return True


def _gathered_forward(q, k, v, lists, *, key_padding_mask, block_size, scale, window, terms,
                      deterministic=False, cuda_kernels="auto"):
    """ops.forward's signature over sparse_attention.gathered."""
    from sparse_attention import gathered

    return gathered.forward(q, k, v, lists, key_padding_mask=key_padding_mask,
                            block_size=block_size, scale=scale, window=window, terms=terms)


def _splits_rows(q: torch.Tensor, terms) -> bool:
    """Whether a call's rows may split across CUDA thread blocks (sparse_attention.split_rows,
    opt-in; it decides per call from the lists). The CPU kernels split rows themselves."""
    return split_rows.enabled(q.device.type) and q.shape[2] <= split_rows.SPLIT_QUERIES and not terms


def _kernel_head_dim(device_type: str, head_dim: int) -> int:
    """The head dim the device's kernels run a call of head dim D at: on CUDA the next
    compiled width (kernel_table.cuda_kernel_head_dim; D itself when none fits, for the error
    to name), on the CPU D itself."""
    if device_type != "cuda" or head_dim < 1:
        return head_dim
    return cuda_kernel_head_dim(head_dim) or head_dim


def _zero_padded_forward(q, k, v, lists, *, width: int, kernels=ops.forward, **call):
    """ops.forward at head dim `width` for both q k^T and the values: q, k, v zero-padded along
    D (zero columns add nothing to the scores, and the output's extra columns are zero and cut
    off; the call's scale is already that of the true D). This runs head dims the kernels are
    not compiled for, and values of another head dim than q and k (Dv != Dqk). Differentiable:
    the padding's gradient is the slice."""
    value_dim = v.shape[-1]
    q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    out, lse = kernels(q, k, v, lists, **call)
    return out[..., :value_dim].contiguous(), lse


def _autocast(*tensors):
    """Under torch.autocast, the tensors cast as autocast casts a lower-precision op's inputs:
    floating tensors other than float64 go to the autocast dtype, so q, k, v of mixed
    precision (fp32 queries from a rotary embedding with bf16 values, say) are fine there."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_inputs(q, k, v, layout, key_padding_mask, documents: int | None = None) -> None:
    """documents: the number of packed documents (cu_seqlens), whose grids a TensorLayout
    holds instead of one for the whole row."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(
            f"q: tensors on {q.device.type} are not supported by this build; supported: "
            f"{', '.join(SUPPORTED_DEVICE_TYPES)}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k, v: expected the same shape but for the head dim, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k: expected batch {batch} (that of q), got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k: expected head_dim {head_dim} (that of q), got {k.shape[3]}")
    kv_heads, k_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k: kv heads ({kv_heads}) must divide the query heads of q ({heads})"
                         + _transposed_hint(q, k))
    if q_len == 0 or k_len == 0 or batch == 0 or head_dim == 0:
        raise ValueError(f"q, k: empty dimension in shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if isinstance(layout, Pattern):
        layout.check_num_heads(heads)  # a pattern builds the layout that fits
    elif isinstance(layout, TensorLayout):
        try:
            layout.check_fits(q, k, documents=documents)
        except ValueError as error:
            raise ValueError(str(error) + _transposed_hint(q, k)) from None
    elif isinstance(layout, BlockLayout):
        try:
            layout.check_fits(q_len, k_len, heads)
        except ValueError as error:
            raise ValueError(str(error) + _transposed_hint(q, k)) from None
    else:
        raise TypeError(
            f"layout: expected a BlockLayout, a TensorLayout or a Pattern (or DeepSpeed-style "
            f"sparsity config), "
            f"got {type(layout).__name__}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask: expected a bool tensor [batch, Nk] (True = ignore)")
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask: expected shape ({batch}, {k_len}), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device}, got {key_padding_mask.device}")


@eager_constant
def _cached_block_lists(layout, q_len, k_len, window, device, num_heads, causal,
                        run_block_size=None) -> tuple[torch.Tensor, ...]:
    # Runs eagerly even under torch.compile: the pattern's layout and the lists become
    # constants of the graph. A plain tuple: torch 2.11's Dynamo cannot unpack a NamedTuple
    # constant. run_block_size: the lists as blocks of that size (_kernel_block_size).
    if isinstance(layout, Pattern):
        layout = layout.layout(q_len, k_len, num_heads=num_heads, causal=causal)
    return tuple(layout.block_lists(q_len, k_len, window, device, run_block_size))


def call_rules(layout, head_dim: int, *, causal: bool, scale, window) -> tuple[float, bool, Window]:
    """(scale, causal, window) that a call applies: the default scale 1/sqrt(D), and a
    pattern's own causality and exact token window on top of the caller's."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    is_pattern = isinstance(layout, Pattern)
    causal = bool(causal) or (is_pattern and layout.causal)
    window = Window.resolve(window, causal=causal,
                            pattern_window=layout.token_window if is_pattern else None)
    return float(scale), causal, window


def call_pieces(layout, q_len: int, k_len: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, keys) of each piece a call runs in: a causal pattern call on
    behalf of a longer sequence (a prefill chunk) that starts inside a block and runs past it
    runs in two, so that each query block gets its whole-sequence row; any other in one."""
    if isinstance(layout, Pattern) and causal:
        return whole_block_pieces(q_len, k_len, layout.block_size)
    return [(0, q_len, k_len)]


def _static_window(window: Window) -> Window:
    # The block lists depend on the window: under dynamic shapes the graph specialises on it
    # (a pattern's or the caller's window ints would otherwise turn symbolic on a change).
    return Window(*(None if w is None else operator.index(w) for w in window))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | TensorLayout | Pattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    cuda_kernels: str = "auto",
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | score_terms.PositionBias | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Generator | None = None,
):
    """Block-sparse scaled dot-product attention.

    Args:
        q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] with H % Hkv == 0 (GQA / MQA); v may have
            another head dim Dv (then out has it). On CUDA a D the kernels are not compiled
            for (kernel_table.CUDA_HEAD_DIMS) runs at the next compiled width, and Dv != D
            at the larger of the two, zero-padded (the same result, the wider call's time).
        layout: which (query block, key block) pairs are computed: a BlockLayout, a
            TensorLayout (per call and input, on q's device: sa.TensorLayout.from_mask,
            .from_indices, sa.select_blocks), or a Pattern (sparse_attention.patterns, or a
            DeepSpeed-style sparsity config), whose layout is built (once, cached) with
            pattern.layout(Nq, Nk, num_heads=H, causal=causal).
        causal: query i sees key j only if j <= i + Nk - Nq (aligned bottom-right). Always on
            for a pattern that is causal by definition (a unidirectional DeepSpeed config).
        scale: multiplies q k^T; default 1/sqrt(D).
        key_padding_mask: bool [B, Nk], True marks keys to ignore.
        window: (left, right) token distances around the diagonal that stay visible inside
            the layout's blocks (None = unbounded on that side); causal sets right to 0. A
            pattern's exact token window (Local(..., exact=True)) narrows it.
        return_lse: also return the log-sum-exp [B, H, Nq] (fp32; fp64 for fp64 inputs).
        deterministic: make the backward pass bit-identical run to run. On CUDA this
            computes dQ in a separate pass over the rows instead of with fp32 atomics (on
            Hopper GPUs at head dim 128 that pass is used anyway: it measured faster); the
            CPU kernels are always deterministic and ignore it.
        cu_seqlens: packed documents, as FlashAttention's varlen: int32/int64 [documents + 1],
            every document's first token in the row and the total; q, k, v hold one row
            ([1, H, T, D], [1, Hkv, Tk, D]). Every document is attended alone, as if it were
            passed on its own with the same pattern, causal rule, window and scale: a pattern
            builds its layout per document length, a TensorLayout gives one grid per document
            ([documents or 1, heads, qb, kb], its top-left corner used for shorter ones).
            Documents may be of any length, empty too.
        cu_seqlens_k: the documents' starts in k and v when they differ from those in q
            (default cu_seqlens).
        cuda_kernels: which CUDA kernels run the call, forward and backward: "auto" (the
            default: the mma.sync kernels, or the Hopper kernels where the environment sets
            SPARSE_ATTENTION_HOPPER_KERNELS=1 and they cover the call), "hopper" (the Hopper
            kernels: TMA, wgmma, warp-specialized; compute capability 9.0, block size 128,
            head dim 64 or 128; a ValueError names the reason where they cannot run the call)
            or "mma" (never the Hopper kernels). The Hopper kernels are opt-in until they have
            passed on a GPU. Ignored on the CPU.

    Score terms (all optional, combinable with every layout and element rule; applied in this
    order, with d = key - query - (Nk - Nq) the distance from the bottom-right diagonal):
        softcap: float > 0: scores become softcap * tanh(scores / softcap) (Gemma 2).
        alibi_slopes: float [H] or [B, H]: adds -slope * |d| (ALiBi; under causal that is
            slope * (key - query - (Nk - Nq))).
        position_bias: a T5 relative position bias: a table [H, num_buckets] (T5's buckets,
            bidirectional unless causal, max_distance 128) or sa.PositionBias(table,
            bidirectional=..., max_distance=...); adds table[h, bucket(d)].
        sinks: float [H]: a logit per head that joins every row's softmax denominator and
            carries no value (gpt-oss, StreamingLLM); lse includes it, and a row that sees no
            key gets 0 with lse = sink.
        dropout_p: attention dropout on the probabilities (pass it in training only), from
            Philox bits keyed by `seed`, batch, head, query row and key row: the backward
            drops exactly what the forward dropped, and a seed gives the same result on every
            run and thread count. seed: an int, a torch.Generator, or None (drawn from
            torch's default generator, so torch.manual_seed repeats it).
    sinks, alibi_slopes and the position table get gradients. The CPU kernels run every term;
    on CUDA a call with any of them runs in block-gathered torch ops (sparse_attention.gathered;
    packed documents one call each, or with dropout densely in float32, O(N^2) memory) and says
    so once (sa.supported lists what each device's kernels take).

    Returns out [B, H, Nq, Dv] (dtype of q), and lse if asked. A query that sees no key gets
    0 and lse = -inf, and zero gradients.
    """
    q, k, v = _autocast(q, k, v)
    if cuda_kernels not in CUDA_KERNEL_CHOICES:
        raise ValueError(f"cuda_kernels: expected one of {', '.join(map(repr, CUDA_KERNEL_CHOICES))}, "
                         f"got {cuda_kernels!r}")
    term_args = dict(sinks=sinks, alibi_slopes=alibi_slopes, softcap=softcap,
                     position_bias=position_bias, dropout_p=dropout_p, seed=seed)
    if cu_seqlens is not None or cu_seqlens_k is not None:
        return _packed_attention(q, k, v, layout, cu_seqlens, cu_seqlens_k, key_padding_mask,
                                 causal=causal, scale=scale, window=window,
                                 return_lse=return_lse, deterministic=deterministic,
                                 cuda_kernels=cuda_kernels, term_args=term_args)
    _check_inputs(q, k, v, layout, key_padding_mask)
    scale, causal, window = call_rules(layout, q.shape[-1], causal=causal, scale=scale, window=window)
    terms = score_terms.resolve(q, causal=causal, **term_args)
    run_block = _kernel_block_size(q, v, layout.block_size)
    finer = None if run_block == layout.block_size else run_block  # the lists' block size, if other
    forward = _forward_for(q, v, run_block, cuda_kernels, terms.names())
    window = _static_window(window)
    # operator.index specialises compiled graphs on the lengths (the block lists depend on
    # them); under dynamic shapes each new length recompiles, the other dims stay dynamic.
    q_len, k_len = operator.index(q.shape[2]), operator.index(k.shape[2])
    if isinstance(layout, TensorLayout):
        # Built in the graph from the layout's tensors: new values never recompile.
        lists = layout.block_lists(q_len, k_len, window, finer)
        out, lse = forward(q, k, v, lists, key_padding_mask=key_padding_mask,
                           block_size=run_block, scale=scale, window=window,
                           deterministic=deterministic, cuda_kernels=cuda_kernels, terms=terms)
        return (out, lse) if return_lse else out
    # A pattern's layout may depend on the head count: graphs specialise on it then only.
    num_heads = operator.index(q.shape[1]) if isinstance(layout, Pattern) else None
    pieces = call_pieces(layout, q_len, k_len, causal)
    if len(pieces) > 1 and terms.dropout_p > 0:
        raise ValueError("dropout_p: not taken by a causal pattern call whose queries start inside "
                         "a block (a prefill chunk): dropout is for training, on whole sequences")
    results = []
    for first, end, keys in pieces:
        part = (q, k, v, key_padding_mask)
        if len(pieces) > 1:
            part = (q[:, :, first:end], k[:, :, :keys], v[:, :, :keys],
                    None if key_padding_mask is None else key_padding_mask[:, :keys])
        lists = _cached_block_lists(layout, end - first, keys, tuple(window), q.device, num_heads,
                                    causal, finer)
        results.append(forward(*part[:3], lists, key_padding_mask=part[3],
                               block_size=run_block, scale=scale, window=window,
                               deterministic=deterministic, cuda_kernels=cuda_kernels,
                               terms=terms))
    out, lse = results[0] if len(results) == 1 else (
        torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2))
    return (out, lse) if return_lse else out


_DENSE_TERMS_WARNED: set[tuple[str, ...]] = set()


def _dense_terms(q, k, v, layout, terms, *, return_lse, cu_seqlens=None, **rules):
    """A CUDA call with score terms, which the CUDA kernels do not take: the dense reference in
    float32 (differentiable), said once per set of terms."""
    from sparse_attention import reference

    names = terms.names()
    if names not in _DENSE_TERMS_WARNED:
        _DENSE_TERMS_WARNED.add(names)
        warnings.warn(f"{', '.join(names)}: the CUDA kernels do not take these score terms yet; "
                      "sparse_attention computes such calls densely in float32 (O(N^2) memory). "
                      "See sa.supported(..., terms=...).", stacklevel=3)
    if isinstance(layout, Pattern) and cu_seqlens is None:
        layout = layout.layout(q.shape[2], k.shape[2], num_heads=q.shape[1], causal=rules["causal"])
    out, lse = reference.attention(q, k, v, layout, return_lse=True, compute_dtype=torch.float32,
                                   cu_seqlens=cu_seqlens, terms=terms, **rules)
    return (out, lse) if return_lse else out


def _packed_attention(q, k, v, layout, cu_seqlens, cu_seqlens_k, key_padding_mask, *, causal,
                      scale, window, return_lse, deterministic, cuda_kernels, term_args):
    """sparse_attention over packed documents: the kernels walk per-document lists in one call
    (on CUDA when enabled, packing.CUDA_PACKED_KERNELS); otherwise each document runs as a call
    of its own (views, no copies)."""
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_k: given without cu_seqlens (the documents' starts in q)")
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask: not taken with cu_seqlens (each document ends where "
                         "its keys do)")
    if isinstance(layout, BlockLayout):
        raise TypeError("layout: a BlockLayout has one fixed grid; packed documents take a "
                        "pattern (built per document length) or a TensorLayout (one grid per "
                        "document, sa.TensorLayout.from_mask)")
    _check_tensor("q", q)
    _check_tensor("k", k)
    packing.check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[2], q.device)
    packing.check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[2], q.device)
    if cu_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k: expected as many documents as cu_seqlens "
                         f"({cu_seqlens.shape[0] - 1}), got {cu_k.shape[0] - 1}")
    _check_inputs(q, k, v, layout, None, documents=cu_seqlens.shape[0] - 1)
    if q.shape[0] != 1:  # k and v have q's batch (_check_inputs)
        raise ValueError(f"q: packed documents (cu_seqlens) take one row [1, heads, total "
                         f"tokens, head_dim], got shape {tuple(q.shape)}")
    rules = call_rules(layout, q.shape[-1], causal=causal, scale=scale, window=window)
    terms = score_terms.resolve(q, causal=rules[1], **term_args)
    if terms.names() and _terms_per_document(q.device, terms):
        return _attention_per_document(q, k, v, layout, cu_seqlens, cu_k, causal=causal,
                                       scale=scale, window=window, return_lse=return_lse,
                                       deterministic=deterministic, cuda_kernels=cuda_kernels,
                                       **term_args)
    if terms.names() and q.device.type == "cuda":
        return _dense_terms(q, k, v, layout, terms, return_lse=return_lse, cu_seqlens=cu_seqlens,
                            cu_seqlens_k=cu_k, causal=causal, scale=scale, window=window)
    # Layouts the kernels run as finer blocks run one call per document, which refines them.
    finer = _kernel_block_size(q, v, layout.block_size) != layout.block_size
    per_document = finer or not packing.packed_kernels(q.device)
    forward = None if per_document else _forward_for(q, v, layout.block_size, cuda_kernels)
    if per_document or forward is _gathered_forward:
        if terms.names():
            raise ValueError(f"{', '.join(terms.names())}: not taken with cu_seqlens on {q.device.type}, "
                             "whose kernels run packed documents one call each")
        return _attention_per_document(q, k, v, layout, cu_seqlens, cu_k, causal=causal,
                                       scale=scale, window=window, return_lse=return_lse,
                                       deterministic=deterministic, cuda_kernels=cuda_kernels)
    scale, causal, window = rules
    window = _static_window(window)
    num_heads = operator.index(q.shape[1])
    lists = packing.packed_lists(layout, cu_seqlens.cpu(), cu_k.cpu(), window, num_heads, causal)
    if q.device.type != "cpu":
        lists = BlockLists(*(t.to(q.device) for t in lists))
    out, lse = forward(q, k, v, lists, key_padding_mask=None, block_size=layout.block_size,
                       scale=scale, window=window, deterministic=deterministic,
                       cuda_kernels=cuda_kernels, cu_seqlens=(cu_seqlens, cu_k), terms=terms)
    return (out, lse) if return_lse else out


def _terms_per_document(device: torch.device, terms) -> bool:
    """Whether packed documents with these score terms run one call each: on CUDA (whose
    kernels take no term, so each document's call runs on the gathered path), but for dropout,
    whose bits are keyed by the packed row's positions (those run densely, _dense_terms)."""
    return device.type == "cuda" and not terms.dropout_p


def _attention_per_document(q, k, v, layout, cu_q, cu_k, *, return_lse, **call):
    """Packed documents as one call each (devices whose kernels do not walk packed lists)."""
    outs, lses = [], []
    for d, (q0, q1, k0, k1) in enumerate(packing.document_bounds(cu_q, cu_k)):
        if q1 == q0:
            continue
        if k1 == k0:
            out, lse = packing.rows_without_keys(q, q1 - q0, v.shape[3], ops.lse_dtype(q.dtype),
                                                 call.get("sinks"))
            outs.append(out)
            lses.append(lse)
            continue
        doc_layout = layout
        if isinstance(layout, TensorLayout):
            doc_layout = TensorLayout(packing.document_mask(layout.mask, d, q1 - q0, k1 - k0,
                                                            layout.block_size)[None],
                                      layout.block_size)
        out, lse = sparse_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], doc_layout,
                                    return_lse=True, **call)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    return (out, lse) if return_lse else out
