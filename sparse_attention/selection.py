"""select_blocks: content-based block selection, a TensorLayout per call and input.

As MInference, XAttention, FlexPrefill, MoBA and SeerAttention do it: pool q and k per block,
score every (query block, key block) pair by the pooled vectors, and keep for every query-block
row the key blocks that carry most of the row's (estimated) attention mass. All of it is
static-shape tensor ops on q's device: no host sync, no data-dependent shape, so it runs
under torch.compile(fullgraph=True) and inside CUDA graphs, and new inputs never recompile.
"""

from __future__ import annotations

import math

import torch

from sparse_attention.layout import check_block_size, num_blocks
from sparse_attention.tensor_layout import TensorLayout

POOLS = ("mean", "max")
HEADS = ("kv", "q", "shared")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_inputs(q, k) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4 or 0 in t.shape:
            raise ValueError(f"{name}: expected a non-empty [batch, heads, seq_len, head_dim] "
                             f"tensor, got shape {tuple(t.shape)}")
    if q.device != k.device:
        raise ValueError(f"q, k: expected one device, got {q.device}, {k.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (that of q), got {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected head_dim {q.shape[3]} (that of q), got {k.shape[3]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: kv heads ({k.shape[1]}) must divide the query heads of q ({q.shape[1]})")


def _reduce(x: torch.Tensor, dim: int, pool: str, dtype: torch.dtype) -> torch.Tensor:
    if pool == "max":
        return x.amax(dim).to(dtype)
    return x.sum(dim, dtype=dtype) / x.shape[dim]


def _pool_blocks(x: torch.Tensor, block_size: int, pool: str, dtype: torch.dtype) -> torch.Tensor:
    """x [..., N, D] pooled per block of block_size tokens (a tail block over its real tokens
    only): [..., ceil(N / bs), D] in dtype. No copy of x."""
    n = x.shape[-2]
    whole = n // block_size
    parts = []
    if whole:
        parts.append(_reduce(x[..., :whole * block_size, :].unflatten(-2, (whole, block_size)),
                             -2, pool, dtype))
    if n > whole * block_size:
        parts.append(_reduce(x[..., whole * block_size:, :], -2, pool, dtype).unsqueeze(-2))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def _pool_prefixes(x: torch.Tensor, block: torch.Tensor, last: torch.Tensor, block_size: int,
                   pool: str, dtype: torch.dtype) -> torch.Tensor:
    """x [..., N, D] pooled over tokens block[i] * bs .. block[i] * bs + last[i] for every i
    (block, last: [R] long, last < bs, within x): [..., R, D]. O(R * bs * D)."""
    n = x.shape[-2]
    tokens = block.unsqueeze(1) * block_size + torch.arange(block_size, device=x.device)
    used = torch.arange(block_size, device=x.device) <= last.unsqueeze(1)  # [R, bs]
    picked = x.index_select(-2, tokens.clamp(max=n - 1).flatten()).unflatten(-2, tokens.shape)
    used = used.unsqueeze(-1)
    if pool == "max":
        return torch.where(used, picked, float("-inf")).amax(-2).to(dtype)
    return torch.where(used, picked, 0).sum(-2, dtype=dtype) / (last + 1).unsqueeze(-1).to(dtype)


@torch.no_grad()
def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    pool: str = "mean",
    causal: bool = False,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    heads: str = "kv",
) -> TensorLayout:
    """Content-based block selection: a TensorLayout of the key blocks each query block needs.

    Pools q [B, H, Nq, D] and k [B, Hkv, Nk, D] per block of `block_size` tokens (blocks from
    token 0, as the op's grid; a tail block pools over its real tokens only), scores every
    (query block r, key block c) pair by pooled q . pooled k / sqrt(D), and takes the softmax
    over the row's candidate key blocks: the row's estimated attention mass per key block.
    It then keeps, per row:

    * the forced blocks: the first `sink_blocks` key blocks and the `local_blocks` nearest the
      diagonal, that is the key block d(r) holding the position p(r) = last query of block r
      + Nk - Nq (bottom-right aligned, as the op's causal rule) and the local_blocks - 1
      before it;
    * with `top_k`: the top_k highest-scoring other candidates (all of them when there are
      fewer), so a row holds at most top_k + sink_blocks + local_blocks blocks;
    * with `threshold` (in (0, 1]): the fewest highest-scoring other candidates such that the
      mass of the forced blocks plus theirs reaches threshold (blocks are added in order of
      mass, while the mass kept so far is below threshold).

    Exactly one of top_k and threshold must be given.

    Under `causal`, the candidates of row r are the key blocks that start at or before p(r);
    blocks wholly after it are neither scored nor normalised over, and never selected (a sink
    too). The block holding p(r) is pooled over its keys up to p(r) only, so row r's choice
    depends on no key after p(r): no output of row r depends on a later token through the
    selection. (It does depend on the other queries of its own block, which are pooled
    together, and so on keys up to the row's last query: causality holds per query block.)
    A row before the first key (Nq > Nk) has no candidate and stays empty.

    `heads` chooses the layout's heads: "kv" one per kv head (its GQA group's query heads
    share it; the score is the mean of the group's softmax masses), "q" one per query head,
    "shared" one for all heads (the mean of all query heads' masses).

    Cost: pooling O(B * H * (Nq + Nk) * D) and scoring O(B * H * (Nq/bs) * (Nk/bs) * D)
    FLOPs (2 D per block pair), plus a sort of every row, O(B * H * (Nq/bs) * (Nk/bs) *
    log(Nk/bs)), and O(B * H * (Nq/bs) * (Nk/bs)) memory. The attention it selects for costs
    4 * bs^2 * D FLOPs per kept block pair per query head: the scoring is 1 / (2 bs^2) of dense
    attention (1/8192 at bs = 64), negligible unless the layout keeps very few blocks.

    Runs without gradients (the layout is not differentiable; the attention through it is).
    Scores in float32 (float64 for float64 inputs).

    Returns a TensorLayout with mask [B, heads (Hkv, H or 1), ceil(Nq/bs), ceil(Nk/bs)] on
    q's device, for `sa.sparse_attention(q, k, v, layout, causal=causal)`.
    """
    _check_inputs(q, k)
    block_size = check_block_size(block_size)
    if (top_k is None) == (threshold is None):
        raise ValueError("top_k, threshold: expected exactly one of them, got "
                         + ("both" if top_k is not None else "neither"))
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 0)
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold: expected a float in (0, 1], got {type(threshold).__name__}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold: expected a float in (0, 1], got {threshold!r}")
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {', '.join(map(repr, POOLS))}, got {pool!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    sink_blocks = _check_int("sink_blocks", sink_blocks, 0)
    local_blocks = _check_int("local_blocks", local_blocks, 0)
    if heads not in HEADS:
        raise ValueError(f"heads: expected one of {', '.join(map(repr, HEADS))}, got {heads!r}")

    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    bs, device = block_size, q.device
    qb, kb = num_blocks(q_len, bs), num_blocks(k_len, bs)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    rows = torch.arange(qb, device=device)
    cols = torch.arange(kb, device=device)
    # p(r): the position of block r's last query; d(r): its key block (< 0: before the first key).
    position = torch.clamp((rows + 1) * bs, max=q_len) - 1 + (k_len - q_len)
    diagonal = torch.div(position, bs, rounding_mode="floor")

    pooled_q = _pool_blocks(q, bs, pool, dtype)  # [B, H, qb, D]
    pooled_k = _pool_blocks(k, bs, pool, dtype)  # [B, Hkv, kb, D]
    scale = 1.0 / math.sqrt(head_dim)
    pooled_q = pooled_q.view(batch, kv_heads, group * qb, head_dim)
    scores = (pooled_q @ pooled_k.transpose(-1, -2) * scale).view(batch, kv_heads, group, qb, kb)

    if causal:
        candidate = cols.unsqueeze(0) <= diagonal.unsqueeze(1)  # [qb, kb]
        # The diagonal block pooled over its keys up to p(r) only: one prefix per row.
        diag_block = diagonal.clamp(0, kb - 1)
        diag_last = (position - diag_block * bs).clamp(0, bs - 1)
        diag_k = _pool_prefixes(k, diag_block, diag_last, bs, pool, dtype)  # [B, Hkv, qb, D]
        diag_scores = (pooled_q.view(batch, kv_heads, group, qb, head_dim)
                       * diag_k.unsqueeze(2)).sum(-1) * scale  # [B, Hkv, G, qb]
        on_diagonal = cols.unsqueeze(0) == diagonal.unsqueeze(1)
        scores = torch.where(on_diagonal, diag_scores.unsqueeze(-1), scores)
    else:
        candidate = torch.ones(qb, kb, dtype=torch.bool, device=device)
    has_candidate = candidate.any(-1, keepdim=True)
    scores = torch.where(candidate, scores, float("-inf"))
    scores = torch.where(has_candidate, scores, 0.0)  # rows with no candidate: no NaN
    mass = torch.where(candidate, torch.softmax(scores, dim=-1), 0.0)

    if heads == "q":
        mass = mass.flatten(1, 2)
    elif heads == "kv":
        mass = mass.mean(2)
    else:
        mass = mass.mean((1, 2)).unsqueeze(1)

    local_start = diagonal.unsqueeze(1) - local_blocks  # exclusive
    forced = (cols.unsqueeze(0) < sink_blocks) | ((cols.unsqueeze(0) > local_start)
                                                  & (cols.unsqueeze(0) <= diagonal.unsqueeze(1)))
    forced = forced & candidate
    others = candidate & ~forced
    if top_k is not None:
        keep = forced
        count = min(top_k, kb)
        if count > 0:
            key = torch.where(others, mass, -1.0)
            values, chosen = key.topk(count, dim=-1)
            picked = torch.zeros_like(others.expand(mass.shape))
            picked = picked.scatter(-1, chosen, values >= 0)
            keep = keep | picked
    else:
        # Forced blocks first, then the others by mass; keep while the mass so far < threshold.
        key = torch.where(forced, mass + 2.0, torch.where(others, mass, -1.0))
        order = key.argsort(dim=-1, descending=True, stable=True)
        sorted_mass = mass.gather(-1, order)
        before = sorted_mass.cumsum(-1) - sorted_mass
        sorted_keep = (before < threshold) | (key.gather(-1, order) > 1.5)
        sorted_keep = sorted_keep & candidate.expand(mass.shape).gather(-1, order)
        keep = torch.zeros_like(sorted_keep).scatter(-1, order, sorted_keep)
    keep = keep.expand(mass.shape)
    return TensorLayout(keep.contiguous(), bs)
