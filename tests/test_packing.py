"""Packed documents (cu_seqlens): every document equals the op run on it alone, against the
package's reference run per document, with gradients; bad cu_seqlens are refused by name."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import packing, patterns, reference
from sparse_attention.patterns import PATTERN_NAMES
from sparse_attention.window import Window

from conftest import assert_grads_rule, assert_rule

BLOCK = 16


def offsets(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


def packed_inputs(q_lengths, k_lengths=None, *, heads=4, kv_heads=2, dim=32,
                  dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    k_lengths = q_lengths if k_lengths is None else k_lengths

    def make(h, n):
        return torch.randn(1, h, n, dim, generator=generator, dtype=torch.float64) \
            .to(device=device, dtype=dtype).requires_grad_()
    return (make(heads, sum(q_lengths)), make(kv_heads, sum(k_lengths)),
            make(kv_heads, sum(k_lengths)))


def check_packed(q, k, v, layout, cu, cu_k=None, deterministic=False, **kwargs):
    """out, lse and dq, dk, dv of the packed call against the per-document reference, under
    the precision rule of the other correctness tests."""
    out, lse = sa.sparse_attention(q, k, v, layout, cu_seqlens=cu, cu_seqlens_k=cu_k,
                                   return_lse=True, deterministic=deterministic, **kwargs)
    exact, exact_lse = reference.attention(q, k, v, layout, cu_seqlens=cu, cu_seqlens_k=cu_k,
                                           return_lse=True, **kwargs)
    low = reference.attention(q, k, v, layout, cu_seqlens=cu, cu_seqlens_k=cu_k,
                              compute_dtype=q.dtype, **kwargs)
    assert out.shape == q.shape[:3] + (v.shape[3],) and out.dtype == q.dtype
    assert_rule("out", out, low, exact)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse)), "lse: -inf rows differ"
    seen = torch.isfinite(exact_lse)
    if seen.any():
        assert (lse[seen] - exact_lse[seen]).abs().max() < 1e-4 * (1 + exact_lse[seen].abs().max())
    assert_grads_rule(out, low, exact, (q, k, v))


# Lengths around the block size, one token, empty documents, a long one.
EDGE_LENGTHS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 0, 5 * BLOCK + 3, 2]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_edge_lengths(causal, dtype):
    q, k, v = packed_inputs(EDGE_LENGTHS, dtype=dtype, seed=1)
    check_packed(q, k, v, patterns.Local(2 * BLOCK, block_size=BLOCK), offsets(EDGE_LENGTHS),
                 causal=causal)


@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_every_pattern(name):
    # Documents of at least 3 blocks: BigBird's and Global's global blocks must exist in each.
    lengths = [37, 130, 48, 64, 91]
    pattern = patterns.from_name(name, seq_len=128, block_size=BLOCK, num_heads=4)
    q, k, v = packed_inputs(lengths, seed=2)
    for causal in (False, True):
        check_packed(q, k, v, pattern, offsets(lengths, torch.int64), causal=causal)


def test_many_short_and_one_long():
    lengths = [3] * 40 + [200] + [1, 7] * 10
    q, k, v = packed_inputs(lengths, heads=2, kv_heads=1, seed=3)
    check_packed(q, k, v, patterns.Fixed(4 * BLOCK, summary=BLOCK, block_size=BLOCK),
                 offsets(lengths), causal=True)


def test_windows_and_exact_token_windows():
    lengths = [50, 17, 96]
    q, k, v = packed_inputs(lengths, seed=4)
    cu = offsets(lengths)
    check_packed(q, k, v, patterns.Dense(block_size=BLOCK), cu, window=(9, 4))
    check_packed(q, k, v, patterns.Local(20, block_size=BLOCK, exact=True), cu, causal=True)


def test_keys_laid_out_differently():
    """cu_seqlens_k: a chunk of queries per document over its longer key prefix (the last
    queries of each document, block-aligned, as chunked prefill has them)."""
    q_lengths, k_lengths = [BLOCK, 2 * BLOCK, 0, 5], [3 * BLOCK, 2 * BLOCK, 7, 5]
    q, k, v = packed_inputs(q_lengths, k_lengths, seed=5)
    check_packed(q, k, v, patterns.Local(2 * BLOCK, block_size=BLOCK), offsets(q_lengths),
                 offsets(k_lengths), causal=True)


def test_equals_the_op_on_each_document_alone():
    """The contract in its own words: each document's rows equal sa.sparse_attention on it."""
    lengths = [20, 70, 33]
    q, k, v = packed_inputs(lengths, seed=6)
    pattern = patterns.BigBird(num_window_blocks=3, num_global_blocks=1, num_random_blocks=1,
                               block_size=BLOCK)
    cu = offsets(lengths)
    out = sa.sparse_attention(q, k, v, pattern, causal=True, cu_seqlens=cu)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        alone = sa.sparse_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pattern, causal=True)
        torch.testing.assert_close(out[:, :, a:b], alone, rtol=0, atol=0)


@pytest.mark.parametrize("shared", [True, False])
def test_tensor_layout_per_document(shared):
    lengths = [40, 100, 1, 0, 64]
    q, k, v = packed_inputs(lengths, seed=7)
    generator = torch.Generator().manual_seed(8)
    docs, grid = len(lengths), -(-max(lengths) // BLOCK) + 1  # a grid larger than needed is fine
    mask = torch.rand(1 if shared else docs, 2, grid, grid, generator=generator) < 0.5
    check_packed(q, k, v, sa.TensorLayout.from_mask(mask, BLOCK), offsets(lengths), causal=True)


def test_gradients_with_gradcheck():
    lengths = [3, BLOCK + 1, 0, 4]
    q, k, v = packed_inputs(lengths, heads=2, kv_heads=1, dim=4, dtype=torch.float64, seed=9)
    cu = offsets(lengths)

    def run(q, k, v):
        return sa.sparse_attention(q, k, v, patterns.Local(BLOCK, block_size=BLOCK),
                                   causal=True, cu_seqlens=cu)
    assert torch.autograd.gradcheck(run, (q, k, v))


# Before torch 2.13 Dynamo traces ops of data-dependent output shapes only when asked
# (docs/packing.md); 2.13 does it anyway.
@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_compiled_graph_takes_new_lengths_without_recompiling():
    torch._dynamo.reset()
    pattern = patterns.Local(2 * BLOCK, block_size=BLOCK)

    def run(q, k, v, cu):
        return sa.sparse_attention(q, k, v, pattern, causal=True, cu_seqlens=cu)
    compiled = torch.compile(run, fullgraph=True, dynamic=False)
    q, k, v = packed_inputs([100], seed=10)
    torch._dynamo.utils.counters.clear()
    for lengths in ([10, 40, 50], [33, 33, 34], [1, 98, 1]):
        cu = offsets(lengths)
        out = compiled(q, k, v, cu)
        torch.testing.assert_close(out, run(q, k, v, cu), rtol=0, atol=0)
        out.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_deterministic_across_thread_counts():
    lengths = [3] * 10 + [150, 40]
    q, k, v = packed_inputs(lengths, seed=11)
    cu = offsets(lengths)
    pattern = patterns.Fixed(4 * BLOCK, summary=BLOCK, block_size=BLOCK)
    grad = torch.randn(q.shape[:3] + (v.shape[3],))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = sa.sparse_attention(q, k, v, pattern, causal=True, cu_seqlens=cu)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


BAD_OFFSETS = [
    (torch.tensor([0, 30, 20, 60]), "cu_seqlens: must be non-decreasing"),
    (torch.tensor([1, 30, 60]), "cu_seqlens: must start at 0"),
    (torch.tensor([0, 30, 59]), "cu_seqlens: must end at the sequence length"),
    (torch.tensor([0.0, 30.0, 60.0]), "cu_seqlens: expected int32 or int64"),
    (torch.tensor([[0, 60]]), r"cu_seqlens: expected a 1-d tensor"),
    (torch.tensor([60]), r"cu_seqlens: expected a 1-d tensor"),
    ([0, 60], "cu_seqlens: expected an int32 or int64 tensor"),
    (torch.tensor([0, 60], device="meta"), "cu_seqlens: expected a tensor on cpu"),
]


@pytest.mark.parametrize("cu, message", BAD_OFFSETS)
def test_bad_cu_seqlens(cu, message):
    q, k, v = packed_inputs([60])
    with pytest.raises(ValueError, match=message):
        sa.sparse_attention(q, k, v, patterns.Local(BLOCK, block_size=BLOCK), cu_seqlens=cu)


def test_bad_packed_calls():
    q, k, v = packed_inputs([30, 30])
    cu, local = offsets([30, 30]), patterns.Local(BLOCK, block_size=BLOCK)
    with pytest.raises(ValueError, match="cu_seqlens_k: given without cu_seqlens"):
        sa.sparse_attention(q, k, v, local, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected as many documents"):
        sa.sparse_attention(q, k, v, local, cu_seqlens=cu, cu_seqlens_k=offsets([60]))
    with pytest.raises(ValueError, match="q: packed documents"):
        sa.sparse_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                            v.expand(2, -1, -1, -1), local, cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_padding_mask: not taken with cu_seqlens"):
        sa.sparse_attention(q, k, v, local, cu_seqlens=cu,
                            key_padding_mask=torch.zeros(1, 60, dtype=torch.bool))
    with pytest.raises(TypeError, match="layout: a BlockLayout has one fixed grid"):
        sa.sparse_attention(q, k, v, local.layout(60), cu_seqlens=cu)
    small = sa.TensorLayout.from_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), BLOCK)
    with pytest.raises(ValueError, match="does not hold the longest documents"):
        sa.sparse_attention(q, k, v, small, cu_seqlens=cu)
    three = sa.TensorLayout.from_mask(torch.ones(3, 1, 2, 2, dtype=torch.bool), BLOCK)
    with pytest.raises(ValueError, match="a TensorLayout for 3 documents"):
        sa.sparse_attention(q, k, v, three, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens: a document of 8 queries and 8 keys: "
                       "num_blocks: 2 global blocks"):
        sa.sparse_attention(q, k, v, patterns.Global(num_blocks=2, block_size=BLOCK),
                            cu_seqlens=offsets([8, 52]))
    with pytest.raises(ValueError, match="starts inside a block"):
        sa.sparse_attention(q[:, :, :40], k, v, local, causal=True, cu_seqlens=offsets([20, 20]),
                            cu_seqlens_k=cu)


def test_op_checks_packed_lists_directly():
    """The op is public through torch.ops: it checks cu_seqlens and per-document lists."""
    q, k, v = (t.detach() for t in packed_inputs([20, 40]))
    cu = offsets([20, 40])
    lists = packing.packed_lists(patterns.Local(BLOCK, block_size=BLOCK), cu, cu, Window(), 4,
                                 False)
    fwd = torch.ops.sparse_attention.forward
    fwd(q, k, v, *lists, None, cu, cu, BLOCK, 0.25, -1, -1)  # valid
    with pytest.raises(ValueError, match="cu_seqlens_q, cu_seqlens_k: expected both or neither"):
        fwd(q, k, v, *lists, None, cu, None, BLOCK, 0.25, -1, -1)
    with pytest.raises(ValueError, match="cu_seqlens_k: must end at"):
        fwd(q, k, v, *lists, None, cu, offsets([20, 30]), BLOCK, 0.25, -1, -1)
    with pytest.raises(ValueError, match="one list set per document"):
        fwd(q, k, v, *lists._replace(row_num_full=lists.row_num_full[:1]), None, cu, cu, BLOCK,
            0.25, -1, -1)
    # A list past a document's blocks must be empty: document 0 has 2 query blocks of 3.
    shifted = lists.row_offsets.clone()
    shifted[3] = shifted[2] + 1
    with pytest.raises(ValueError, match="past its document's blocks"):
        fwd(q, k, v, *lists._replace(row_offsets=shifted), None, cu, cu, BLOCK, 0.25, -1, -1)
