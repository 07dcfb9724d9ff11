"""The CPU forward's split of long rows for calls of few queries (decode steps, speculative
verification): each row's key blocks are cut into pieces walked as tasks of their own and
merged by their softmax statistics. The result matches the fp64 reference and the unsplit
full pass, and the cut depends on the lengths alone: the same bits for any batch and any
thread count."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from conftest import check_against_reference, max_error


def inputs(batch, heads, kv_heads, q_len, k_len, dim=32, seed=0, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)

    return rand(batch, heads, q_len, dim), rand(batch, kv_heads, k_len, dim), rand(batch, kv_heads, k_len, dim)


@pytest.mark.parametrize("q_len", [1, 2, 7, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_rows_match_the_reference(q_len, dtype):
    """At most 64 queries split (Nk = 3000 over blocks of 64: 47 blocks, 3 pieces); 65 do not."""
    q, k, v = inputs(2, 4, 2, q_len, 3000, dtype=dtype, seed=q_len)
    for causal in (False, True):
        layout = sa.Longformer(512, block_size=64).layout(q_len, 3000, num_heads=4, causal=causal)
        check_against_reference(q, k, v, layout, dict(causal=causal))


def test_decode_steps_equal_the_full_pass():
    """The last rows of an unsplit causal pass (4000 queries) against split decode calls."""
    q, k, v = inputs(1, 2, 1, 4000, 4000, grad=False)
    pattern = sa.Dense(block_size=64)
    full, full_lse = sa.sparse_attention(q, k, v, pattern, causal=True, return_lse=True)
    for start in (3999, 3990, 3936):
        out, lse = sa.sparse_attention(q[:, :, start:], k, v, pattern, causal=True, return_lse=True)
        assert max_error(out, full[:, :, start:]) < 2e-6
        assert max_error(lse, full_lse[:, :, start:]) < 2e-6


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_split_is_batch_and_thread_invariant(kv_heads):
    q, k, v = inputs(3, 4, kv_heads, 1, 5000, grad=False)
    pattern = sa.Local(4096, block_size=64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = sa.sparse_attention(q, k, v, pattern, causal=True)
        torch.set_num_threads(1)
        single = [sa.sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern, causal=True)
                  for b in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, torch.cat(single))


def test_split_with_score_terms_padding_and_empty_pieces():
    """Sinks join once, after the merge; dropout and the biases are per element; a piece whose
    keys are all padded leaves the others' result alone."""
    q, k, v = inputs(2, 4, 2, 3, 3000, seed=5)
    pad = torch.zeros(2, 3000, dtype=torch.bool)
    pad[0, :2000] = True  # whole pieces padded
    pad[1, 1000:1100] = True
    g = torch.Generator().manual_seed(6)
    terms = dict(sinks=torch.randn(4, generator=g).requires_grad_(),
                 alibi_slopes=(torch.rand(4, generator=g) * 0.01).requires_grad_(), softcap=5.0,
                 dropout_p=0.2, seed=17)
    layout = sa.Dense(block_size=64).layout(3, 3000, num_heads=4)
    check_against_reference(q, k, v, layout, dict(key_padding_mask=pad, **terms))


def test_split_packed_decode():
    """Three documents of one query each (a batch of decode steps, packed)."""
    q, k, v = inputs(1, 4, 2, 3, 5500, seed=7)
    cu = torch.tensor([0, 1, 2, 3])
    cu_k = torch.tensor([0, 2000, 2500, 5500])
    check_against_reference(q, k, v, sa.Local(1024, block_size=64),
                            dict(cu_seqlens=cu, cu_seqlens_k=cu_k, causal=True))


@pytest.mark.parametrize("group, q_len", [(2, 1), (2, 3), (4, 1), (4, 4), (8, 2), (8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_gqa_heads_walked_together_match_the_reference(group, q_len, dtype):
    """Calls of at most 16 rows over a GQA group (queries times the group's heads) walk the
    group's heads in one task, each key block read once for all of them; 8 heads of 3 queries
    do not. Causal partial blocks, Nk not a multiple of the block, key padding, and a batch
    entry whose window sees only padded keys (rows that see nothing)."""
    heads, k_len = 2 * group, 1000
    q, k, v = inputs(2, heads, 2, q_len, k_len, seed=10 * group + q_len, dtype=dtype)
    pad = torch.zeros(2, k_len, dtype=torch.bool)
    pad[0, 100:300] = True
    pad[1, k_len - 300:] = True  # the window of Local(128) sees padding only
    for pattern in (sa.Dense(block_size=64), sa.Local(128, block_size=32)):
        layout = pattern.layout(q_len, k_len, num_heads=heads, causal=True)
        check_against_reference(q, k, v, layout, dict(causal=True, key_padding_mask=pad))
    # Per-head layouts are not walked together: the same result.
    mask = sa.Dense(block_size=64).layout(q_len, k_len, num_heads=heads).mask.expand(heads, -1, -1)
    check_against_reference(q, k, v, sa.BlockLayout(mask.clone(), 64), dict(causal=True), check_grads=False)


def test_gqa_heads_walked_together_keep_hidden_values_out():
    """A value of inf at a key that causality hides from some queries of each head reaches
    only the query that sees it."""
    q, k, v = inputs(1, 8, 2, 3, 1000, grad=False)
    v[:, :, -1] = float("inf")
    out = sa.sparse_attention(q, k, v, sa.Dense(block_size=64), causal=True)
    finite = v.clone()
    finite[:, :, -1] = 0
    want = sa.sparse_attention(q, k, finite, sa.Dense(block_size=64), causal=True)
    assert torch.isfinite(out[:, :, :2]).all() and not torch.isfinite(out[:, :, 2]).any()
    assert max_error(out[:, :, :2], want[:, :, :2]) < 1e-6

