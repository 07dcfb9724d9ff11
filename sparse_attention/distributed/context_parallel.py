"""context_parallel_attention: sparse attention over a sequence sharded across the ranks of
a process group, that moves only the key/value blocks the layout needs.

Each rank computes from the layout (the same on every rank) the exchange plan of
`plan.make_plan`, posts every send and receive at once, attends to its own keys while the
others travel, then to each received piece as it arrives, and merges the parts by lse. The
backward sends the dK/dV of every received piece back to its owner the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparse_attention.attention import call_rules, sparse_attention
from sparse_attention.bounded_cache import BoundedCache
from sparse_attention.distributed.exchange import Exchange
from sparse_attention.distributed.lse_merge import merge_by_lse
from sparse_attention.distributed.plan import Plan, make_plan
from sparse_attention.distributed.sharding import Sharding, check_sharding
from sparse_attention.layout import BlockLayout
from sparse_attention.patterns.base import Pattern
from sparse_attention.tensor_layout import TensorLayout
from sparse_attention.window import Window

# Arguments of sparse_attention that a sharded call cannot pass on as they are.
_REFUSED = {"key_padding_mask": "keys are sharded; leave padded blocks out of the layout",
            "return_lse": "the merged lse is not returned",
            "cu_seqlens": "packed documents are not split across shards"}

_PLANS = BoundedCache()


def group_sharding(group, sharding: str, shard_len: int) -> tuple[Sharding, int]:
    """(the Sharding of a sequence of world x shard_len tokens over group, this rank in it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: context parallelism needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    world = dist.get_world_size(group)
    return Sharding(check_sharding(sharding), world, shard_len * world), dist.get_rank(group)


def _check_shapes(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a tensor [B, heads, N / world, D]")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"k, v: expected this rank's {q.shape[2]} tokens (those of q), got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


def _check_layout_type(layout) -> None:
    if not isinstance(layout, (Pattern, BlockLayout, TensorLayout)):
        raise TypeError(f"layout: expected a Pattern, a BlockLayout or a TensorLayout of the whole "
                        f"sequence, got {type(layout).__name__}")


def _full_layout(layout, seq_len: int, num_heads: int, causal: bool):
    if isinstance(layout, Pattern):
        return layout.layout(seq_len, seq_len, num_heads=num_heads, causal=causal)
    blocks = seq_len // layout.block_size
    if tuple(layout.mask.shape[-2:]) != (blocks, blocks):
        raise ValueError(f"layout: a {tuple(layout.mask.shape[-2:])} block grid; expected the whole "
                         f"sequence's {blocks} x {blocks} (N = {seq_len}, block_size "
                         f"{layout.block_size})")
    return layout


def _op_rules(layout, head_dim: int, causal: bool, op_kwargs: dict) -> tuple[bool, dict]:
    """The call's causal rule, and the op's arguments without the window, which must be no
    more than the causal rule (a token window across shards is not expressible per piece)."""
    for name, why in _REFUSED.items():
        if op_kwargs.get(name) is not None and op_kwargs[name] is not False:
            raise ValueError(f"{name}: not supported by context_parallel_attention ({why})")
    kwargs = dict(op_kwargs)
    window = kwargs.pop("window", None)
    _, causal, resolved = call_rules(layout, head_dim, causal=causal, scale=kwargs.get("scale"),
                                     window=window)
    if resolved != Window(None, 0 if causal else None):
        raise ValueError(f"window: context_parallel_attention applies no token window but the "
                         f"causal rule, got {tuple(resolved)} (from window= or the pattern's "
                         "exact window); use a block pattern (exact=False)")
    return causal, kwargs


def plan_for(layout, sharding: Sharding, rank: int, num_heads: int, causal: bool) -> Plan:
    """rank's exchange plan (cached for a pattern or a BlockLayout, made per call for a
    TensorLayout). causal: the call's rule, the pattern's own included."""
    full = _full_layout(layout, sharding.seq_len, num_heads, causal)
    if isinstance(full, TensorLayout):
        return make_plan(full, sharding, rank, causal)
    return _PLANS.get((full, sharding, rank, causal), lambda: make_plan(full, sharding, rank, causal))


def _local_and_received(q, k, v, plan: Plan, group, grad: bool, op_kwargs: dict):
    """(the (out, lse) parts, their key sources: None for the local one or (rank, the
    received [2, B, Hkv, n, D] leaf), the q, k, v leaves) of one forward."""
    kv = torch.stack((k, v))  # one message per pair of ranks
    exchange = Exchange({dst: kv.index_select(3, tokens.to(kv.device))
                         for dst, tokens in plan.send_tokens.items()},
                        {src: (*kv.shape[:3], plan.received_tokens(src), kv.shape[4])
                         for src in plan.sources},
                        like=kv, group=group, phase="forward")
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    parts, sources = [], []
    with torch.set_grad_enabled(grad):
        if plan.local_layout is not None:
            parts.append(sparse_attention(*leaves, plan.local_layout, causal=plan.causal,
                                          return_lse=True, **op_kwargs))
            sources.append(None)
        for source in plan.sources:  # in ring order: the first to arrive first
            received = exchange.wait(source).requires_grad_(grad)
            parts.append(sparse_attention(leaves[0], received[0], received[1],
                                          plan.remote_layouts[source], return_lse=True,
                                          **op_kwargs))
            sources.append((source, received))
    exchange.finish()
    return parts, sources, leaves


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, group, op_kwargs: dict):
        grad = any(ctx.needs_input_grad[:3])
        parts, sources, leaves = _local_and_received(q, k, v, plan, group, grad, op_kwargs)
        if not parts:  # no row sees a key (others may still see this rank's keys)
            merge_inputs, merged = [], q.new_zeros(q.shape)
        elif not grad:
            return merge_by_lse([p[0] for p in parts], [p[1] for p in parts])
        else:
            with torch.enable_grad():
                merge_inputs = [tuple(t.detach().requires_grad_() for t in part) for part in parts]
                merged = merge_by_lse([p[0] for p in merge_inputs], [p[1] for p in merge_inputs])
        ctx.graph = (plan, group, leaves, parts, sources, merge_inputs, merged)
        return merged.detach()

    @staticmethod
    def backward(ctx, grad_out):
        plan, group, (q, k, v), parts, sources, merge_inputs, merged = ctx.graph
        del ctx.graph  # the graphs go as soon as this backward is done
        returned = Exchange({}, {dst: (2, *k.shape[:2], len(tokens), k.shape[3])
                                 for dst, tokens in plan.send_tokens.items()},
                            like=k, group=group, phase="backward")
        flat = [t for part in merge_inputs for t in part]
        part_grads = torch.autograd.grad(merged, flat, grad_out, allow_unused=True) if flat else ()
        grad_q = torch.zeros_like(q)
        grad_kv = torch.zeros((2, *k.shape), dtype=k.dtype, device=k.device)
        sent = []
        # Remote pieces first, so that their dK/dV travel while the local piece is computed.
        for i in sorted(range(len(parts)), key=lambda i: sources[i] is None):
            pairs = [(t, g) for t, g in zip(parts[i], part_grads[2 * i:2 * i + 2]) if g is not None]
            wrt = [q, k, v] if sources[i] is None else [q, sources[i][1]]
            got = torch.autograd.grad([t for t, _ in pairs], wrt, [g for _, g in pairs],
                                      allow_unused=True)
            got = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, got)]
            grad_q += got[0]
            if sources[i] is None:
                grad_kv[0] += got[1]
                grad_kv[1] += got[2]
            else:
                sent.append(Exchange({sources[i][0]: got[1]}, {}, like=k, group=group,
                                     phase="backward"))
        for destination, tokens in plan.send_tokens.items():
            grad_kv.index_add_(3, tokens.to(k.device), returned.wait(destination))
        for exchange in sent:
            exchange.finish()
        returned.finish()
        return grad_q, grad_kv[0], grad_kv[1], None, None, None


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *,
                               group=None, causal: bool = False, sharding: str = "contiguous",
                               **op_kwargs) -> torch.Tensor:
    """Block-sparse attention over a sequence sharded across the ranks of `group`.

    Args:
        q: this rank's shard of the queries [B, H, N / world, D]; k, v: [B, Hkv, N / world, D].
        layout: a Pattern (built for the whole sequence: pattern.layout(N, N, num_heads=H,
            causal=causal)), or a BlockLayout or TensorLayout of the whole sequence, the same
            on every rank.
        group: the process group whose ranks hold the shards (default: the whole world).
        causal: the causal rule over global positions.
        sharding: "contiguous" (rank r holds tokens [r N / world, (r + 1) N / world)) or
            "zigzag" (2 x world chunks, rank r holds chunks r and 2 world - 1 - r); see
            sparse_attention.distributed.Sharding.
        op_kwargs: sparse_attention's scale and deterministic.

    Returns this rank's rows of the whole sequence's result [B, H, N / world, D]; q, k and v
    get their gradients. N must be divisible by world x block_size (2 x world x block_size
    for zigzag).
    """
    _check_shapes(q, k, v)
    _check_layout_type(layout)
    seq, rank = group_sharding(group, sharding, q.shape[2])
    seq.check_whole_blocks(layout.block_size)
    causal, op_kwargs = _op_rules(layout, q.shape[-1], causal, op_kwargs)
    plan = plan_for(layout, seq, rank, q.shape[1], causal)
    return _ContextParallelAttention.apply(q, k, v, plan, group, op_kwargs)
