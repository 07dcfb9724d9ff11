"""Packed documents: many sequences in one row, each attended alone with its own block grid.

`cu_seqlens` are FlashAttention's varlen offsets: int32/int64 [documents + 1], the start of
every document in the row and the total. The kernels take per-document block lists laid out
[documents, layout heads, blocks] (blocks: the longest document's, shorter ones padded with
empty lists), which this module builds: for a pattern from its layout per document length
(cached per length, and the assembled lists per list of lengths, since every layer of a model
asks for the same ones), for a TensorLayout from its per-document masks.
"""

from __future__ import annotations

import os
import weakref

import torch

from sparse_attention import ops
from sparse_attention.bounded_cache import BoundedCache
from sparse_attention.compile_constants import eager_constant, live_object
from sparse_attention.layout import BlockLists, num_blocks
from sparse_attention.patterns.base import Pattern
from sparse_attention.window import Window

_OFFSET_DTYPES = (torch.int32, torch.int64)

# The CUDA kernels walk packed lists too, but have not yet run on a GPU: until they have
# passed there, CUDA runs packed documents one call each unless this is set to 1.
CUDA_PACKED_KERNELS = "SPARSE_ATTENTION_CUDA_PACKED_KERNELS"


def packed_kernels(device: torch.device) -> bool:
    """Whether the device's kernels take packed lists in one call."""
    return device.type == "cpu" or os.environ.get(CUDA_PACKED_KERNELS) == "1"


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    """ValueError naming `name` unless cu is an int32/int64 [documents + 1] tensor on `device`
    (q's) or the CPU that starts at 0, never decreases and ends at `total` (the values are
    checked in eager mode; in compiled graphs the op checks them)."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 or int64 tensor [documents + 1], got "
                         f"{type(cu).__name__}")
    if cu.dtype not in _OFFSET_DTYPES:
        raise ValueError(f"{name}: expected int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-d tensor [documents + 1] (the documents' starts "
                         f"and the total), got shape {tuple(cu.shape)}")
    if cu.device not in (device, torch.device("cpu")):
        raise ValueError(f"{name}: expected a tensor on {device} (that of q) or the CPU, got "
                         f"{cu.device}")
    if torch.compiler.is_compiling():
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {values[0]}")
    for d in range(1, len(values)):
        if values[d] < values[d - 1]:
            raise ValueError(f"{name}: must be non-decreasing, but entry {d} ({values[d]}) is "
                             f"below entry {d - 1} ({values[d - 1]})")
    if values[-1] != total:
        raise ValueError(f"{name}: must end at the sequence length of the tensors ({total}), "
                         f"got {values[-1]}")


def document_lengths(cu: torch.Tensor) -> list[int]:
    values = cu.tolist()
    return [b - a for a, b in zip(values, values[1:])]


def document_bounds(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(first query, end query, first key, end key) of every document."""
    q, k = cu_q.tolist(), cu_k.tolist()
    return list(zip(q, q[1:], k, k[1:]))


def document_mask(mask: torch.Tensor, d: int, q_len: int, k_len: int, block_size: int):
    """Document d's grid [heads, q_blocks, k_blocks] in a packed TensorLayout's mask [documents
    or 1, heads, ...]: the top-left corner of its own (or the shared) grid."""
    grid = mask[d if mask.shape[0] > 1 else 0]
    return grid[:, :num_blocks(q_len, block_size), :num_blocks(k_len, block_size)]


def rows_without_keys(q: torch.Tensor, rows: int, value_dim: int, lse_dtype: torch.dtype,
                      sinks: torch.Tensor | None = None):
    """(out, lse) of `rows` queries of a document that has no key: zeros and -inf, as for any
    row that sees none; with sinks [H], lse is the sink (all such a row's denominator holds)."""
    out = q.new_zeros(1, q.shape[1], rows, value_dim)
    if sinks is not None:
        return out, sinks.to(lse_dtype).view(1, -1, 1).expand(1, q.shape[1], rows)
    return out, torch.full((1, q.shape[1], rows), float("-inf"), dtype=lse_dtype, device=q.device)


def _empty_lists(layout_heads: int, q_len: int, k_len: int, block_size: int) -> BlockLists:
    """The lists of a document without queries or without keys: every list empty."""
    def part(blocks):
        return (torch.zeros(layout_heads * blocks + 1, dtype=torch.int32),
                torch.zeros(0, dtype=torch.int32),
                torch.zeros(1, layout_heads, blocks, dtype=torch.int32))
    return BlockLists(*part(num_blocks(q_len, block_size)), *part(num_blocks(k_len, block_size)))


def _padded_part(parts, layout_heads: int, width: int | None):
    """(offsets, indices, num_full) over [documents, layout heads, width] from every
    document's (offsets, indices, num_full [1, heads, its blocks]); width defaults to the most
    blocks of a document. Documents that share one list set (one object) are filled together."""
    width = width or max(num_full.shape[-1] for _, _, num_full in parts)
    counts = torch.zeros(len(parts), layout_heads, width, dtype=torch.int32)
    full = torch.zeros_like(counts)
    groups: dict[int, list[int]] = {}
    for d, part in enumerate(parts):
        groups.setdefault(id(part[0]), []).append(d)
    for docs in groups.values():
        offsets, _, num_full = parts[docs[0]]
        heads, blocks = num_full.shape[1:]
        if heads != layout_heads:
            raise ValueError(f"layout: gives {heads} heads for one document and {layout_heads} "
                             "for another")
        index = torch.tensor(docs, dtype=torch.long)
        counts[index, :, :blocks] = offsets.diff().view(heads, blocks)
        full[index, :, :blocks] = num_full[0]
    indices = torch.cat([indices[: int(offsets[-1])] for offsets, indices, _ in parts])
    offsets = torch.nn.functional.pad(counts.flatten().cumsum(0, dtype=torch.int64), (1, 0))
    return offsets.to(torch.int32), indices, full


def assemble(per_doc: list[BlockLists], widths: tuple[int, int] | None = None) -> BlockLists:
    """The kernels' packed lists [documents, layout heads, blocks] from every document's own
    BlockLists (on the CPU, num_full [1, heads, its blocks]; documents of one shape and
    pattern may share one object). widths: (query, key) blocks of the padded grid; default
    the longest document's."""
    layout_heads = max(lists.row_num_full.shape[1] for lists in per_doc)
    q_width, k_width = widths or (None, None)
    rows = _padded_part([lists[:3] for lists in per_doc], layout_heads, q_width)
    cols = _padded_part([lists[3:] for lists in per_doc], layout_heads, k_width)
    return BlockLists(*rows, *cols)


def pattern_lists(pattern, cu_q: torch.Tensor, cu_k: torch.Tensor, window: Window,
                  num_heads: int, causal: bool, cache: BoundedCache) -> BlockLists:
    """Per-document lists of a pattern: its layout for every document's lengths, kept in
    `cache` by (document lengths, window, heads, causal), since every layer of a model makes
    the same call."""
    from sparse_attention.attention import call_pieces  # attention imports this module

    lengths = tuple(zip(document_lengths(cu_q), document_lengths(cu_k)))
    heads = 1

    def lists_of(q_len, k_len):
        if q_len == 0 or k_len == 0:
            return _empty_lists(heads, q_len, k_len, pattern.block_size)
        if len(call_pieces(pattern, q_len, k_len, causal)) > 1:
            raise ValueError(f"cu_seqlens: a document of {q_len} queries over {k_len} keys is a "
                             f"causal chunk that starts inside a block of {pattern.block_size}; "
                             "packed chunks must start on a block boundary")
        try:
            layout = pattern.layout(q_len, k_len, num_heads=num_heads, causal=causal)
        except ValueError as error:  # a pattern that needs longer sequences than a document
            raise ValueError(f"cu_seqlens: a document of {q_len} queries and {k_len} keys: "
                             f"{error}") from None
        return layout.block_lists(q_len, k_len, window, torch.device("cpu"))

    def build():
        nonlocal heads
        shapes = {shape: None for shape in lengths}
        for shape in sorted(shapes, key=lambda s: 0 in s):  # empty documents last: heads known
            shapes[shape] = lists_of(*shape)
            heads = max(heads, shapes[shape].row_num_full.shape[1])
        return assemble([shapes[shape] for shape in lengths])

    return cache.get((lengths, tuple(window), num_heads, causal), build)


def mask_lists(mask: torch.Tensor, block_size: int, cu_q: torch.Tensor, cu_k: torch.Tensor,
               window: Window) -> BlockLists:
    """Per-document lists of a bool block mask [documents or 1, heads, q_blocks, k_blocks]
    (on the CPU) whose grid holds every document's blocks: document d uses the top-left
    corner of its own (or the shared) mask that its lengths cover. The lists keep the mask's
    grid, so their shapes follow the mask's alone."""
    lengths = list(zip(document_lengths(cu_q), document_lengths(cu_k)))
    need = tuple(max(num_blocks(n, block_size) for n in side) for side in zip(*lengths))
    if mask.shape[2] < need[0] or mask.shape[3] < need[1]:
        raise ValueError(f"layout: a {mask.shape[2]} x {mask.shape[3]} block grid does not hold "
                         f"the longest documents ({need[0]} x {need[1]} blocks of {block_size})")
    heads = mask.shape[1]
    per_doc = []
    for d, (q_len, k_len) in enumerate(lengths):
        if q_len == 0 or k_len == 0:
            per_doc.append(_empty_lists(heads, q_len, k_len, block_size))
            continue
        grid = document_mask(mask, d, q_len, k_len, block_size)
        built = ops.build_block_lists(grid.contiguous(), q_len, k_len, block_size, window)
        per_doc.append(BlockLists(*built[:2], built[2].view(1, heads, -1), *built[3:5],
                                  built[5].view(1, heads, -1)))
    return assemble(per_doc, widths=tuple(mask.shape[2:]))


# Under torch.compile the lists come from these ops: opaque to the compiler, so new document
# lengths (new cu_seqlens values of the same shape) never recompile; the lists' sizes depend
# on the values and are left symbolic. Dynamo traces such ops by default from torch 2.13;
# before (2.7 checked), only with torch._dynamo.config.capture_dynamic_output_shape_ops set,
# and otherwise the lists are built in a graph break (correct, but new list sizes recompile
# the graph after it).
_TRACES_DYNAMIC_SHAPE_OPS = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13)


def _dynamic_shape_ops_traced() -> bool:
    return _TRACES_DYNAMIC_SHAPE_OPS or torch._dynamo.config.capture_dynamic_output_shape_ops


_PATTERN_CACHES: dict[int, BoundedCache] = {}


def pattern_cache(pattern) -> BoundedCache:
    """The packed-list cache of a live pattern (dropped with it)."""
    key = id(pattern)
    if key not in _PATTERN_CACHES:
        _PATTERN_CACHES[key] = BoundedCache(size=16)
        weakref.finalize(pattern, _PATTERN_CACHES.pop, key, None)
    return _PATTERN_CACHES[key]


@eager_constant
def _layout_heads(pattern, num_heads: int, causal: bool) -> int:
    return pattern.layout(pattern.block_size, num_heads=num_heads, causal=causal).num_heads


@torch.library.custom_op("sparse_attention::packed_pattern_lists", mutates_args=())
def _packed_pattern_lists(cu_q: torch.Tensor, cu_k: torch.Tensor, pattern_id: int,
                          window_left: int, window_right: int, num_heads: int, causal: bool,
                          layout_heads: int) -> list[torch.Tensor]:
    pattern = live_object(pattern_id)
    window = Window.from_kernel_bounds(window_left, window_right)
    lists = pattern_lists(pattern, cu_q, cu_k, window, num_heads, causal, pattern_cache(pattern))
    return [t.clone() for t in lists]


@_packed_pattern_lists.register_fake
def _packed_pattern_lists_fake(cu_q, cu_k, pattern_id, window_left, window_right, num_heads,
                               causal, layout_heads):
    return _symbolic_lists(cu_q.shape[0] - 1, layout_heads, None)


@torch.library.custom_op("sparse_attention::packed_mask_lists", mutates_args=())
def _packed_mask_lists(mask: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                       block_size: int, window_left: int, window_right: int) -> list[torch.Tensor]:
    lists = mask_lists(mask, block_size, cu_q, cu_k,
                       Window.from_kernel_bounds(window_left, window_right))
    return list(lists)


@_packed_mask_lists.register_fake
def _packed_mask_lists_fake(mask, cu_q, cu_k, block_size, window_left, window_right):
    return _symbolic_lists(cu_q.shape[0] - 1, mask.shape[1], tuple(mask.shape[2:]))


def _symbolic_lists(documents: int, heads: int, widths) -> list[torch.Tensor]:
    ctx = torch.library.get_ctx()
    q_width, k_width = widths or (ctx.new_dynamic_size(), ctx.new_dynamic_size())

    def part(width):
        return [torch.empty(documents * heads * width + 1, dtype=torch.int32),
                torch.empty(ctx.new_dynamic_size(), dtype=torch.int32),
                torch.empty(documents, heads, width, dtype=torch.int32)]
    return part(q_width) + part(k_width)


def packed_lists(layout, cu_q: torch.Tensor, cu_k: torch.Tensor, window: Window,
                 num_heads: int, causal: bool) -> BlockLists:
    """The kernels' per-document lists of a pattern or a TensorLayout's mask (CPU tensors)."""
    left, right = window.kernel_bounds()
    traced = torch.compiler.is_compiling() and _dynamic_shape_ops_traced()
    if isinstance(layout, Pattern):
        if traced:
            heads = _layout_heads(layout, num_heads, causal)
            return BlockLists(*_packed_pattern_lists(cu_q, cu_k, id(layout), left, right,
                                                     num_heads, causal, heads))
        return _eager_pattern_lists(layout, cu_q, cu_k, window, num_heads, causal)
    mask = layout.mask.cpu()  # a sync where the mask lives on a GPU: the lists are built here
    if traced:
        return BlockLists(*_packed_mask_lists(mask, cu_q, cu_k, layout.block_size, left, right))
    return _eager_mask_lists(mask, layout.block_size, cu_q, cu_k, window)


@torch.compiler.disable
def _eager_pattern_lists(pattern, cu_q, cu_k, window, num_heads, causal) -> BlockLists:
    return pattern_lists(pattern, cu_q, cu_k, window, num_heads, causal, pattern_cache(pattern))


@torch.compiler.disable
def _eager_mask_lists(mask, block_size, cu_q, cu_k, window) -> BlockLists:
    return mask_lists(mask, block_size, cu_q, cu_k, window)
