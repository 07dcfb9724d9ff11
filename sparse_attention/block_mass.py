"""block_attention_mass: the attention probability mass every computed block pair carries.

Given the lse that `sa.sparse_attention(..., return_lse=True)` returned, the softmax weight of
query i on key j is P = exp(q_i . k_j * scale - lse_i) wherever the layout's blocks and the
element rules (causal, window, key padding, tails) let i see j, and 0 elsewhere. Summed per
(query block, key block) this is what gate distillation (SeerAttention's block targets),
recall measurement (the mass a selected layout keeps of dense attention) and
interpretability need. Computed in chunks of query-block rows against all keys, never the
whole [Nq, Nk] score matrix at once, with static-shape tensor ops (no host sync).
"""

from __future__ import annotations

import operator

import torch

from sparse_attention import ops
from sparse_attention.attention import _cached_block_lists, _check_inputs, call_pieces, call_rules
from sparse_attention.ops import lse_dtype
from sparse_attention.window import Window
from sparse_attention.compile_constants import eager_constant
from sparse_attention.layout import BlockLayout, num_blocks
from sparse_attention.patterns.base import Pattern
from sparse_attention.tensor_layout import TensorLayout

# Elements of one chunk's score matrix [B, H, chunk queries, Nk] to aim for (a chunk holds at
# least one query-block row).
CHUNK_ELEMENTS = 1 << 24


@eager_constant
def _fixed_rows(layout, q_len, k_len, num_heads, causal, device) -> torch.Tensor:
    """The block rows the op computes for a BlockLayout or a Pattern, [1, heads, rows, kb]:
    the layout's rows, one set per piece of the call (in order). A constant of compiled graphs,
    as the op's block lists are."""
    kb = num_blocks(k_len, layout.block_size)
    masks = []
    for first, end, keys in call_pieces(layout, q_len, k_len, causal):
        if isinstance(layout, Pattern):
            mask = layout.layout(end - first, keys, num_heads=num_heads, causal=causal).mask
        else:
            mask = layout.mask
        masks.append(torch.nn.functional.pad(mask, (0, kb - mask.shape[-1])))
    heads = max(m.shape[0] for m in masks)
    rows = torch.cat([m.expand(heads, *m.shape[1:]) for m in masks], dim=1)
    return rows.unsqueeze(0).to(device)


@eager_constant
def _fixed_heads(layout, q_len, k_len, num_heads, causal) -> int:
    # The heads of _fixed_rows as a Python int (compiled graphs cannot read the shape of an
    # eager constant).
    if not isinstance(layout, Pattern):
        return layout.num_heads
    return max(layout.layout(end - first, keys, num_heads=num_heads, causal=causal).num_heads
               for first, end, keys in call_pieces(layout, q_len, k_len, causal))


def _rows(layout, q_len, k_len, num_heads, causal, device):
    """(block rows [Lb, Lh, R, kb] on device, row of every query [Nq], Lh) of the computed
    blocks."""
    bs = layout.block_size
    queries = torch.arange(q_len, device=device)
    if isinstance(layout, TensorLayout):
        return layout.mask, torch.div(queries, bs, rounding_mode="floor"), layout.mask.shape[1]
    rows = _fixed_rows(layout, q_len, k_len, num_heads, causal, device)
    heads = _fixed_heads(layout, q_len, k_len, num_heads, causal)
    parts, base = [], 0
    for first, end, _ in call_pieces(layout, q_len, k_len, causal):
        parts.append(base + torch.div(queries[first:end] - first, bs, rounding_mode="floor"))
        base += num_blocks(end - first, bs)
    return rows, (torch.cat(parts) if len(parts) > 1 else parts[0]), heads


def _check_lse(lse, q) -> None:
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse: expected a torch.Tensor, got {type(lse).__name__}")
    if not lse.is_floating_point():
        raise TypeError(f"lse: expected a floating tensor, got {lse.dtype}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse: expected shape {tuple(q.shape[:3])} ([B, H, Nq], as "
                         f"sa.sparse_attention(..., return_lse=True) returns it), got "
                         f"{tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse: expected device {q.device}, got {lse.device}")


@torch.no_grad()
def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TensorLayout | BlockLayout | Pattern,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
) -> torch.Tensor:
    """Attention probability mass of every block pair: float32 [B, H, q_blocks, k_blocks].

    mass[b, h, r, c] = sum over the queries i of query block r and the keys j of key block c
    that query i sees of P[i, j] = exp(q_i . k_j * scale - lse[b, h, i]), with lse as
    `sa.sparse_attention(q, k, v, layout, return_lse=True, ...)` returned it for the same
    arguments. "Sees" is the op's rule: (r, c) is a block of the layout (or of the pattern's
    layout, `pattern.layout(Nq, Nk, num_heads=H, causal=causal)`; a causal call that starts
    inside a block takes each query's row as the op does) and the element rules (causal,
    window, a pattern's token window, key_padding_mask, tails) let i see j. Blocks the layout
    does not compute, and rows whose lse is -inf (queries that see no key), give 0.

    Sums: for every query i that sees a key, its weights sum to 1, so sum_c mass[b, h, r, c]
    equals the number of queries of block r that see a key (up to rounding); divided by the
    queries of block r (block_size, fewer in a tail block) it is 1 when they all see one.
    The mean over a row's queries of the mass a set S of blocks keeps, sum_{c in S} mass[b,
    h, r, c] / queries of block r, is S's recall of the attention the lse belongs to (lse of
    layout sa.Dense: recall of dense attention).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D] (H % Hkv == 0).
        layout: a TensorLayout, a BlockLayout or a Pattern, as the op takes.
        lse: [B, H, Nq], from the op with return_lse=True.
        causal, scale, key_padding_mask, window: as the op's (scale default 1/sqrt(D)).

    Cost: the scores again, O(B * H * Nq * Nk * D) FLOPs (all key blocks of a row are scored,
    then masked), in chunks of query-block rows: O(B * H * chunk * Nk) memory, chunks of about
    2^24 scores. Float32 arithmetic (float64 for float64 inputs). Runs without gradients (a
    target for distillation, not a loss term). No host sync: works under torch.compile
    (fullgraph=True) and in CUDA graphs.
    """
    _check_inputs(q, k, k, layout, key_padding_mask)
    _check_lse(lse, q)
    scale, causal, (left, right) = call_rules(layout, q.shape[-1], causal=causal, scale=scale,
                                              window=window)

    num_heads = q.shape[1]
    q_len, k_len = operator.index(q.shape[2]), operator.index(k.shape[2])
    if q.device.type == "cpu" and len(call_pieces(layout, q_len, k_len, causal)) == 1:
        # The CPU kernel walks the op's own lists: O(computed blocks), not O(Nq * Nk).
        window = Window(left, right)
        if isinstance(layout, TensorLayout):
            lists = layout.block_lists(q_len, k_len, window)
        else:
            heads = operator.index(num_heads) if isinstance(layout, Pattern) else None
            lists = _cached_block_lists(layout, q_len, k_len, tuple(window), q.device, heads, causal)
        return ops.block_mass(q, k, lse.to(lse_dtype(q.dtype)), lists,
                              key_padding_mask=key_padding_mask, block_size=layout.block_size,
                              scale=scale, window=window)
    return tensor_block_mass(q, k, layout, lse, causal=causal, scale=scale,
                             key_padding_mask=key_padding_mask, window=Window(left, right))


def tensor_block_mass(q, k, layout, lse, *, causal: bool, scale: float, key_padding_mask,
                      window: Window) -> torch.Tensor:
    """block_attention_mass by tensor ops, a chunk of query-block rows at a time (on a GPU,
    and for causal pattern calls the op runs in two pieces): every key of a row is scored."""
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    q_len, k_len = operator.index(q_len), operator.index(k_len)
    left, right = window
    group = num_heads // kv_heads
    bs, device = layout.block_size, q.device
    qb, kb = num_blocks(q_len, bs), num_blocks(k_len, bs)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    rows, row_of_query, lh = _rows(layout, q_len, k_len, operator.index(num_heads), causal, device)
    # Layout heads onto [kv heads, group]: per query head, per kv head (its group shares), shared.
    rows = rows.unflatten(1, (kv_heads, group)) if lh == num_heads and lh != kv_heads \
        else rows.unsqueeze(2)

    qc = q.to(dtype).view(batch, kv_heads, group, q_len, head_dim)
    kc = k.to(dtype).unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, Nk]
    lse = lse.to(dtype).view(batch, kv_heads, group, q_len, 1)
    keys = torch.arange(k_len, device=device)
    key_block = torch.div(keys, bs, rounding_mode="floor")
    key_kept = None if key_padding_mask is None else ~key_padding_mask[:, None, None, None, :]

    chunk_rows = max(1, CHUNK_ELEMENTS // max(1, batch * num_heads * bs * k_len))
    parts = []
    for r0 in range(0, qb, chunk_rows):
        r1 = min(qb, r0 + chunk_rows)
        i0, i1 = r0 * bs, min(q_len, r1 * bs)
        scores = qc[..., i0:i1, :] @ kc * scale  # [B, Hkv, G, chunk, Nk]
        # Visible: the query's block row holds the key's block, and the element rules.
        row = rows.index_select(-2, row_of_query[i0:i1])  # [Lb, Hkv|1, G|1, chunk, kb]
        visible = row.index_select(-1, key_block)  # [.., chunk, Nk]
        dist = keys.unsqueeze(0) - torch.arange(i0, i1, device=device).unsqueeze(1) - (k_len - q_len)
        if left is not None:
            visible = visible & (dist >= -left)
        if right is not None:
            visible = visible & (dist <= right)
        if key_kept is not None:
            visible = visible & key_kept
        row_lse = lse[..., i0:i1, :]
        visible = visible & torch.isfinite(row_lse)
        probs = torch.where(visible, torch.exp(torch.where(visible, scores - row_lse, 0.0)), 0.0)
        probs = torch.nn.functional.pad(probs, (0, kb * bs - k_len, 0, (r1 - r0) * bs - (i1 - i0)))
        parts.append(probs.unflatten(-1, (kb, bs)).sum(-1).unflatten(-2, (r1 - r0, bs)).sum(-2))
    mass = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
    return mass.reshape(batch, num_heads, qb, kb).to(torch.float32)
