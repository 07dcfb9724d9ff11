"""Block-sparse attention in plain torch ops, over the kernels' block lists.

What runs a CUDA call the CUDA kernels are not compiled for (float32 and float64 inputs,
block sizes 16 and 32, head dims above 128, GPUs older than sm_80, score terms): each query
block's listed key blocks are gathered, their scores computed by batched matmuls (cuBLAS: TF32
tensor cores for float32 where torch.backends.cuda.matmul.allow_tf32 allows, else exact;
float64 on CUDA cores), masked by the element rules, and softmaxed. The work and the memory
follow the computed blocks, not N^2: query blocks are taken in chunks of rows of similar
length, and the backward recomputes each chunk and differentiates it alone. The keys'
gradients are added with index_add (atomics on CUDA: not bit-identical run to run).

Registered as two torch ops, sparse_attention::gathered_forward and gathered_backward (with
fake kernels and autograd), so that compiled graphs keep them whole: their host syncs (the
chunks follow the lists' lengths) stay inside. Same contract as the kernels' op
(sparse_attention.ops.forward): out in q's dtype, lse in ops.lse_dtype, a query that sees no
key gets 0 and lse = -inf (the sink with sinks).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from sparse_attention.ops import lse_dtype
from sparse_attention.score_terms import NO_TERMS, Terms, dropout_keep_at
from sparse_attention.window import Window

# Elements of the gathered keys, values and scores one chunk of rows may hold at once.
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 and bf16 are computed in fp32, as the kernels accumulate them; fp32 and fp64 as is."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _Terms(NamedTuple):
    """The score terms as the op takes them (Terms.op_args): tensors or None."""
    sinks: Optional[torch.Tensor]
    alibi_slopes: Optional[torch.Tensor]
    position_bias: Optional[torch.Tensor]  # the table [H, buckets]
    position_buckets: Optional[torch.Tensor]  # int32 [Nq + Nk - 1]
    softcap: float
    dropout_p: float
    seed: int


class _Call:
    """One call's rows: row r is (batch entry, query head, query block) in that order, its list
    block_rules.h's list_index; and the chunks of rows the call runs in."""

    def __init__(self, q, k, v, row_offsets, row_indices, row_num_full, key_padding_mask,
                 block_size: int, scale: float, window_left: int, window_right: int, terms: _Terms):
        self.q, self.terms = q, terms
        self.batch, self.heads, self.q_len, head_dim = q.shape
        self.kv_heads, self.k_len, self.value_dim = k.shape[1], k.shape[2], v.shape[3]
        self.bs, self.scale = block_size, scale
        self.left = None if window_left < 0 else window_left
        self.right = None if window_right < 0 else window_right
        self.row_indices = row_indices.long()
        offsets = row_offsets.long()
        list_batch, layout_heads, self.q_blocks = row_num_full.shape
        device = q.device
        self.all_rows = self.batch * self.heads * self.q_blocks
        row = torch.arange(self.all_rows, device=device)
        self.row_qb = row % self.q_blocks
        self.row_head = row // self.q_blocks % self.heads
        self.row_batch = row // (self.q_blocks * self.heads)
        self.row_kv = self.row_batch * self.kv_heads + self.row_head // (self.heads // self.kv_heads)
        list_of_row = (((self.row_batch if list_batch > 1 else 0) * layout_heads
                        + self.row_head // (self.heads // layout_heads)) * self.q_blocks + self.row_qb)
        self.starts = offsets[list_of_row]
        self.row_counts = offsets[list_of_row + 1] - self.starts
        self.cdtype = compute_dtype(q.dtype)
        self.pads = None if key_padding_mask is None else key_padding_mask.to(device)
        self.per_row = self.bs * max(head_dim, self.value_dim, self.bs) * 3

    def chunks(self):
        """(rows, num_blocks) of each chunk: rows sorted by list length, longest first, as many
        per chunk as CHUNK_ELEMENTS allows; rows without blocks are in none."""
        counts = self.row_counts.cpu()
        order = torch.argsort(counts, descending=True, stable=True)
        sorted_counts = counts[order].tolist()
        start = 0
        while start < len(sorted_counts) and sorted_counts[start] > 0:
            num_blocks = sorted_counts[start]
            end = min(start + max(1, CHUNK_ELEMENTS // (self.per_row * num_blocks)), len(sorted_counts))
            while sorted_counts[end - 1] == 0:
                end -= 1
            yield order[start:end].to(self.q.device), num_blocks
            start = end

    def chunk(self, rows, num_blocks, q_part, k_flat, v_flat):
        """(out [rows, bs, Dv], lse [rows, bs]) of the rows `rows` over their first num_blocks
        listed key blocks (slots past a row's count are masked); differentiable in q_part,
        k_flat, v_flat and the call's term tensors."""
        device, bs, k_len, q_len, terms = self.q.device, self.bs, self.k_len, self.q_len, self.terms
        slot = torch.arange(num_blocks, device=device)
        listed = slot < self.row_counts[rows].unsqueeze(1)
        last = max(self.row_indices.numel() - 1, 0)
        blocks = self.row_indices[(self.starts[rows].unsqueeze(1) + slot).clamp(max=last)]
        keys = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=device)).flatten(1)
        seen = listed.repeat_interleave(bs, dim=1) & (keys < k_len)
        keys = keys.clamp(max=k_len - 1)
        flat = self.row_kv[rows].unsqueeze(1) * k_len + keys
        if self.pads is not None:
            seen = seen & ~self.pads[self.row_batch[rows].unsqueeze(1), keys]
        queries = self.row_qb[rows].view(-1, 1) * bs + torch.arange(bs, device=device)
        dist = keys.unsqueeze(1) - queries.unsqueeze(2) - (k_len - q_len)
        visible = seen.unsqueeze(1) & (queries < q_len).unsqueeze(2)
        if self.left is not None:
            visible = visible & (dist >= -self.left)
        if self.right is not None:
            visible = visible & (dist <= self.right)
        kg = k_flat.index_select(0, flat.reshape(-1)).view(*flat.shape, -1).to(self.cdtype)
        vg = v_flat.index_select(0, flat.reshape(-1)).view(*flat.shape, -1).to(self.cdtype)
        batch, head = self.row_batch[rows], self.row_head[rows]
        scores = _with_terms((q_part.to(self.cdtype) @ kg.transpose(1, 2)) * self.scale, terms, dist,
                             batch, head, k_len)
        scores = scores.masked_fill(~visible, float("-inf"))
        # The softmax by hand: a row that sees no key must give 0 and lse = -inf (the sink,
        # with sinks) with finite gradients, where logsumexp's backward would give NaN. The
        # shift m cancels exactly, so it carries no gradient.
        m = scores.detach().amax(dim=-1, keepdim=True)
        sink = None
        if terms.sinks is not None:
            sink = terms.sinks.to(self.cdtype)[head].view(-1, 1, 1)
            m = torch.maximum(m, sink.detach())
        m = torch.where(torch.isfinite(m), m, 0)
        p = torch.exp(scores - m)
        total = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            total = total + torch.exp(sink - m)
        seen_any = total > 0
        total = torch.where(seen_any, total, 1)
        lse = torch.where(seen_any, m + torch.log(total), float("-inf")).squeeze(-1)
        p = p / total
        if terms.dropout_p > 0:
            keep = dropout_keep_at(terms.seed, terms.dropout_p, batch.view(-1, 1, 1),
                                   head.view(-1, 1, 1), queries.unsqueeze(2), keys.unsqueeze(1))
            p = p * keep / (1 - terms.dropout_p)
        return p @ vg, lse.to(lse_dtype(self.q.dtype))

    def rows_without_keys_lse(self) -> torch.Tensor:
        """lse [rows, bs] where no chunk writes: -inf, or the sink with sinks."""
        dtype = lse_dtype(self.q.dtype)
        if self.terms.sinks is None:
            return torch.full((self.all_rows, self.bs), float("-inf"), dtype=dtype, device=self.q.device)
        return self.terms.sinks.to(dtype)[self.row_head].unsqueeze(1).expand(-1, self.bs).contiguous()

    def finish(self, out_rows: torch.Tensor, lse_rows: torch.Tensor):
        out = out_rows.view(self.batch, self.heads, self.q_blocks * self.bs, self.value_dim)
        lse = lse_rows.view(self.batch, self.heads, self.q_blocks * self.bs)
        return out[:, :, :self.q_len].to(self.q.dtype).contiguous(), lse[:, :, :self.q_len].contiguous()

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """A [B, H, Nq, ...] tensor as [rows, bs, ...], the last block zero-padded."""
        pad = self.q_blocks * self.bs - self.q_len
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
        return t.reshape(self.all_rows, self.bs, *t.shape[3:])


def _with_terms(scores, terms: _Terms, dist, batch, head, k_len: int):
    """Scores [rows, queries, keys] soft-capped, plus the ALiBi and position biases of the
    distances `dist` (as reference._with_terms, on gathered rows of batch entries `batch` and
    heads `head`)."""
    if terms.softcap > 0:
        scores = terms.softcap * torch.tanh(scores / terms.softcap)
    if terms.alibi_slopes is not None:
        slopes = terms.alibi_slopes.to(scores.dtype)
        slopes = slopes[head] if slopes.dim() == 1 else slopes[batch, head]
        scores = scores - slopes.view(-1, 1, 1) * dist.abs().to(scores.dtype)
    if terms.position_bias is not None:
        # buckets[d + k_len - 1] is distance d's; the queries past the end (masked anyway)
        # are clamped into range.
        buckets = terms.position_buckets.to(dist.device).long()
        bucket = buckets[(dist + k_len - 1).clamp(0, buckets.numel() - 1)]
        table = terms.position_bias.to(scores.dtype)
        scores = scores + table[head.view(-1, 1, 1), bucket]
    return scores


@torch.library.custom_op("sparse_attention::gathered_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_offsets: torch.Tensor,
                row_indices: torch.Tensor, row_num_full: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor], block_size: int, scale: float,
                window_left: int, window_right: int, sinks: Optional[torch.Tensor],
                alibi_slopes: Optional[torch.Tensor], position_bias: Optional[torch.Tensor],
                position_buckets: Optional[torch.Tensor], softcap: float, dropout_p: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    terms = _Terms(sinks, alibi_slopes, position_bias, position_buckets, softcap, dropout_p, seed)
    call = _Call(q, k, v, row_offsets, row_indices, row_num_full, key_padding_mask, block_size,
                 scale, window_left, window_right, terms)
    out_rows = torch.zeros(call.all_rows, block_size, call.value_dim, dtype=call.cdtype, device=q.device)
    lse_rows = call.rows_without_keys_lse()
    q_rows, k_flat, v_flat = call.rows_of(q), k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])
    for rows, num_blocks in call.chunks():
        out_rows[rows], lse_rows[rows] = call.chunk(rows, num_blocks, q_rows[rows], k_flat, v_flat)
    return call.finish(out_rows, lse_rows)


@_forward_op.register_fake
def _(q, k, v, *args):
    return (q.new_empty(*q.shape[:3], v.shape[3]), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype)))


@contextlib.contextmanager
def _autograd_inside_an_op():
    """Autograd inside an op's implementation, which runs below the autograd dispatch keys:
    they leave the thread's exclude set for the block (and grad mode is on)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor,
                torch._C.DispatchKey.AutogradFunctionality):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


@torch.library.custom_op("sparse_attention::gathered_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, row_offsets: torch.Tensor,
                 row_indices: torch.Tensor, row_num_full: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor], block_size: int, scale: float,
                 window_left: int, window_right: int, sinks: Optional[torch.Tensor],
                 alibi_slopes: Optional[torch.Tensor], position_bias: Optional[torch.Tensor],
                 position_buckets: Optional[torch.Tensor], softcap: float, dropout_p: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks, dslopes, dtable): each chunk recomputed and differentiated alone
    (its autograd graph lives only while it is differentiated); a term the call did not have
    gets an empty tensor."""
    def leaf(t):
        return None if t is None else t.detach().to(compute_dtype(q.dtype)).requires_grad_()

    terms = _Terms(leaf(sinks), leaf(alibi_slopes), leaf(position_bias), position_buckets, softcap,
                   dropout_p, seed)
    call = _Call(q, k, v, row_offsets, row_indices, row_num_full, key_padding_mask, block_size,
                 scale, window_left, window_right, terms)
    cdtype = call.cdtype
    # Leaves in the compute type, so that each chunk's gradients add up unrounded.
    q_rows = call.rows_of(q).to(cdtype)
    with _autograd_inside_an_op():
        k_flat = k.reshape(-1, k.shape[-1]).detach().to(cdtype).requires_grad_()
        v_flat = v.reshape(-1, v.shape[-1]).detach().to(cdtype).requires_grad_()
    grad_out_rows = call.rows_of(grad_out).to(cdtype)
    grad_lse_rows = None if grad_lse is None else call.rows_of(grad_lse)
    term_leaves = [t for t in terms[:3] if t is not None]
    grad_q_rows = torch.zeros(q_rows.shape, dtype=cdtype, device=q.device)
    grad_k, grad_v = torch.zeros_like(k_flat), torch.zeros_like(v_flat)
    grad_terms = [None if t is None else torch.zeros_like(t) for t in terms[:3]]  # sinks, slopes, table
    covered = torch.zeros(call.all_rows, dtype=torch.bool, device=q.device)
    for rows, num_blocks in call.chunks():
        covered[rows] = True
        with _autograd_inside_an_op():
            q_part = q_rows[rows].detach().requires_grad_()
            out, lse = call.chunk(rows, num_blocks, q_part, k_flat, v_flat)
            outputs, grads = [out], [grad_out_rows[rows]]
            if grad_lse_rows is not None:
                outputs.append(lse)
                grads.append(torch.where(torch.isfinite(lse), grad_lse_rows[rows].to(lse.dtype), 0))
            found = torch.autograd.grad(outputs, [q_part, k_flat, v_flat, *term_leaves], grads,
                                        allow_unused=True)
        for total, part in zip([grad_k, grad_v, *(g for g in grad_terms if g is not None)], found[1:]):
            if part is not None:
                total += part
        if found[0] is not None:
            grad_q_rows[rows] = found[0]
    if terms.sinks is not None and grad_lse_rows is not None:
        # A row without keys has lse = its sink.
        empty = ~covered
        grad_terms[0].index_add_(0, call.row_head[empty], grad_lse_rows[empty].sum(-1).to(cdtype))
    grad_q = grad_q_rows.view(call.batch, call.heads, -1, q.shape[-1])[:, :, :call.q_len]
    term_grads = tuple(torch.empty(0, dtype=torch.float32, device=q.device) if grad is None
                       else grad.to(given.dtype)
                       for grad, given in zip(grad_terms, (sinks, alibi_slopes, position_bias)))
    return (grad_q.to(q.dtype).contiguous(), grad_k.view(k.shape).to(k.dtype),
            grad_v.view(v.shape).to(v.dtype)) + term_grads


@_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, row_offsets, row_indices, row_num_full, key_padding_mask,
      block_size, scale, window_left, window_right, sinks, alibi_slopes, position_bias, *args):
    def like(t):
        return torch.empty_like(t) if t is not None else q.new_empty(0, dtype=torch.float32)

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(sinks),
            like(alibi_slopes), like(position_bias))


_DIFFERENTIABLE = {"q": 0, "k": 1, "v": 2, "sinks": 3, "alibi_slopes": 4, "position_bias": 5}
_FORWARD_ARGS = tuple(a.name for a in torch.ops.sparse_attention.gathered_forward.default._schema.arguments)


def _is_tensor_arg(t) -> bool:
    return t is None or isinstance(t, torch.Tensor)  # the Tensor? arguments may be None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if _is_tensor_arg(t)))
    ctx.others = tuple(None if _is_tensor_arg(t) else t for t in inputs)


def _backward(ctx, grad_out, grad_lse):
    saved = iter(ctx.saved_tensors)
    inputs = [next(saved) if _is_tensor_arg(other) else other for other in ctx.others]
    if grad_out is None:
        grad_out = torch.zeros(*inputs[0].shape[:3], inputs[2].shape[3], dtype=inputs[0].dtype,
                               device=inputs[0].device)
    grads = _backward_op(grad_out, grad_lse, *inputs)
    return tuple(grads[_DIFFERENTIABLE[name]] if name in _DIFFERENTIABLE and given is not None
                 else None for name, given in zip(_FORWARD_ARGS, inputs))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def forward(q, k, v, lists, *, key_padding_mask, block_size: int, scale: float,
            window: Window = Window(), terms: Terms = NO_TERMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the op over the block lists (a BlockLists): rows only (the column lists
    serve the kernels' backward). terms: the score terms, applied as the kernels and the
    reference apply them (dropout from the same Philox bits, keyed by the tensors' rows)."""
    left, right = Window.of(window).kernel_bounds()
    return _forward_op(q, k, v, lists[0], lists[1], lists[2], key_padding_mask, int(block_size),
                       float(scale), left, right, **terms.op_args(q.shape[2], k.shape[2], q.device))
