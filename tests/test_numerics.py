"""Numerical edge cases: huge logits, inf/NaN inputs, denormals, tiny shapes, size limits."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from conftest import Case, FLOOR, assert_rule, make_inputs, max_error, run_case

REDUCED = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", [*REDUCED, torch.float32], ids=str)
@pytest.mark.parametrize("factor", [1e2, 1e3, 1e4])
def test_huge_logits_stay_finite_and_accurate(dtype, factor):
    # q * factor gives logits of up to ~1e5: exp of them overflows every float type. Baseline
    # of the rule: the reference in the inputs' precision; where that overflows (float16 at
    # 1e4), the float32 reference for out, and finite gradients (with logits this large they
    # are ill-conditioned: no float32 computation of them is accurate).
    case = Case(batch=2, heads=2, kv_heads=1, q_len=90, k_len=110, head_dim=32, density=0.6,
                causal=True, padding=True, dtype=dtype, seed=int(factor))
    q, k, v, layout, pad = make_inputs(case, requires_grad=False)
    q = (q.double().clamp(-4, 4) * factor).to(dtype).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    kwargs = dict(causal=True, key_padding_mask=pad)
    out = sa.sparse_attention(q, k, v, layout, **kwargs)
    exact = reference.attention(q, k, v, layout, **kwargs)
    low = reference.attention(q, k, v, layout, compute_dtype=dtype, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    low_grads = torch.autograd.grad(low, (q, k, v), grad)
    if torch.isfinite(low).all() and all(torch.isfinite(g).all() for g in low_grads):
        exact_grads = torch.autograd.grad(exact, (q, k, v), grad)
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), (out, *ours), (low, *low_grads), (exact, *exact_grads)):
            assert_rule(name, a, b, c)
    else:
        f32 = reference.attention(q.float(), k.float(), v.float(), layout, compute_dtype=torch.float32, **kwargs)
        assert_rule("out", out, f32.to(dtype), exact)
        assert all(torch.isfinite(g).all() for g in ours)


def seen_mask(layout, q, k, kwargs):
    """[B, H, Nq, Nk] bool: whether query i sees key j (GQA heads expanded)."""
    mask = reference.element_mask(layout, q.shape[2], k.shape[2], **kwargs)
    return mask.expand(q.shape[0], q.shape[1], -1, -1)


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("operand", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_finite_inputs_affect_only_the_rows_that_use_them(operand, value, dtype):
    # A value row at key j is used by the queries that see j; a query row by its own query.
    # Those rows may turn NaN (always do for NaN); every other row, head and batch entry must
    # come out exactly as without the bad value.
    case = Case(batch=2, heads=4, kv_heads=2, q_len=70, k_len=90, head_dim=16, density=0.6,
                per_head=True, causal=True, padding=True, dtype=dtype, seed=21)
    q, k, v, layout, pad = make_inputs(case, requires_grad=False)
    kwargs = dict(causal=True, key_padding_mask=pad)
    clean = sa.sparse_attention(q, k, v, layout, **kwargs)
    seen = seen_mask(layout, q, k, kwargs)
    group = q.shape[1] // k.shape[1]
    # Poison one element in several rows of batch 1, head 1 (kv head 0): one inside a diagonal
    # block and one in a padded position that nothing sees.
    bad = {"q": q, "k": k, "v": v}[operand].clone()
    rows = [5, 37, 61] if operand == "q" else [5, 37, 61, 80]
    head = 1 if operand == "q" else 0
    for r in rows:
        bad[1, head, r, 3] = value
    args = {"q": q, "k": k, "v": v, operand: bad}
    out, lse = sa.sparse_attention(args["q"], args["k"], args["v"], layout, return_lse=True, **kwargs)
    affected = torch.zeros(q.shape[:3], dtype=torch.bool)
    if operand == "q":
        for r in rows:
            affected[1, head, r] = seen[1, head, r].any()
    else:
        for h in range(head * group, (head + 1) * group):
            affected[1, h] = seen[1, h][:, rows].any(-1)
    assert affected.any() and (~affected).any()
    unaffected = ~affected
    assert torch.equal(out[unaffected], clean[unaffected]), "a row that does not use the bad value changed"
    if value != value:  # NaN in, NaN out: whole rows for q and k, element 3 for v (and lse)
        hit = out[affected]
        if operand == "v":
            assert torch.isnan(hit[:, 3]).all() and not torch.isnan(hit[:, :3]).any()
        else:
            assert torch.isnan(hit).all() and torch.isnan(lse[affected]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *REDUCED], ids=str)
def test_denormal_values(dtype):
    # Subnormal values (below the smallest normal number of the dtype) are not flushed to 0.
    tiny = {torch.float32: 1e-40, torch.float64: 1e-310, torch.float16: 1e-6, torch.bfloat16: 1e-40}[dtype]
    case = Case(q_len=50, k_len=70, head_dim=16, density=0.7, causal=True, dtype=dtype, seed=22)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    v = (v.double() * tiny).to(dtype)
    assert (v != 0).any() and (v.abs() < torch.finfo(dtype).tiny).any()
    out = sa.sparse_attention(q, k, v, layout, causal=True)
    exact = reference.attention(q, k, v, layout, causal=True)
    low = reference.attention(q, k, v, layout, causal=True, compute_dtype=dtype if dtype != torch.float16 else torch.float32)
    assert (out != 0).any()
    # The rule's floor scaled to the values' size, plus a few units of the smallest subnormal.
    bound = 2 * max_error(low, exact) + FLOOR[dtype] * tiny + 8 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert max_error(out, exact) <= bound


@pytest.mark.parametrize(
    "case",
    [
        Case(q_len=1, k_len=1, head_dim=1, block_size=16, density=1.0),
        Case(q_len=1, k_len=300, head_dim=1, block_size=64, density=0.5, causal=True),
        Case(q_len=300, k_len=1, head_dim=8, block_size=32, density=1.0, causal=True),
        Case(q_len=37, k_len=45, head_dim=1, block_size=16, density=0.6, padding=True, dtype=torch.float64),
        Case(batch=2048, heads=2, kv_heads=1, q_len=2, k_len=3, head_dim=4, density=1.0, causal=True, padding=True),
        Case(batch=512, heads=1, kv_heads=1, q_len=1, k_len=1, head_dim=1, density=1.0, dtype=torch.bfloat16),
    ],
    ids=str,
)
def test_tiny_shapes(case):
    run_case(case)


def expanded(shape, dtype=torch.float32):
    """A tensor of `shape` backed by a single element (stride 0 everywhere): huge shapes cost
    no memory."""
    return torch.ones(1, 1, 1, 1, dtype=dtype).expand(*shape)


def test_lengths_beyond_int32_block_indices_are_refused():
    # 2**40 keys are 2**36 blocks of 16: more than int32 block lists can index. Refused with
    # a ValueError before anything is allocated (the tensors are stride-0 views).
    lists = sa.BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16).block_lists(16, 16, None, torch.device("cpu"))
    q = expanded((1, 1, 16, 16))
    k = expanded((1, 1, 2**40, 16))
    with pytest.raises(ValueError, match="k: sequence length 1099511627776 needs more than 2147483647 blocks"):
        torch.ops.sparse_attention.forward(q, k, k, *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="q: sequence length"):
        torch.ops.sparse_attention.forward(k, q, q, *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="q: sequence length"):
        torch.ops.sparse_attention.build_block_lists(torch.ones(1, 1, 1, dtype=torch.bool), 2**62, 16, 16, -1, -1)


@pytest.mark.parametrize("block_size", [257, 2**32, 2**62])
def test_block_sizes_beyond_the_scratch_limit_are_refused(block_size):
    # The kernels keep block_size**2 scores per thread: 2**32 would overflow that count.
    q = torch.randn(1, 1, 5, 8)
    lists = sa.BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16).block_lists(5, 5, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="block_size: expected an integer from 1 to 256"):
        torch.ops.sparse_attention.forward(q, q, q, *lists, None, None, None, block_size, 0.25, -1, -1)
    with pytest.raises(ValueError, match="block_size"):
        torch.ops.sparse_attention.build_block_lists(torch.ones(1, 1, 1, dtype=torch.bool), 5, 5, block_size, -1, -1)


def test_layout_with_more_blocks_than_int32_lists_is_refused():
    # A stride-0 mask of 2**31 blocks: refused before the private copy is made.
    mask = torch.ones(1, 1, 1, dtype=torch.bool).expand(2, 2**15, 2**15)
    with pytest.raises(ValueError, match="mask: 2147483648 blocks"):
        sa.BlockLayout(mask, 16)


def test_reference_refuses_what_cannot_fit_in_memory():
    # 2**20 queries and keys: the dense reference would need terabytes of scores. The inputs
    # are stride-0 views and the layout is 4096 x 4096 blocks, so nothing large exists yet.
    q = expanded((1, 1, 2**20, 1))
    layout = sa.BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool).expand(1, 4096, 4096), 256)
    with pytest.raises(MemoryError, match="reference.attention: needs at least"):
        reference.attention(q, q, q, layout)
    with pytest.raises(MemoryError, match="reference.element_mask: needs at least 1024.0 GiB"):
        reference.element_mask(layout, 2**20, 2**20)


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("operand", ["q", "k", "v", "grad"])
def test_non_finite_values_reach_only_the_gradients_that_depend_on_them(operand, value):
    # Rows that use a bad value (as in the forward test; a bad upstream gradient row is used by
    # its own row) are affected; their dq, and dk, dv of the keys they see, may be NaN. All
    # other gradients equal those of the clean run (up to rounding: tiles holding the bad
    # value are summed pair by pair).
    case = Case(batch=2, heads=4, kv_heads=2, q_len=70, k_len=90, head_dim=16, density=0.6,
                per_head=True, causal=True, padding=True, seed=25)
    q, k, v, layout, pad = make_inputs(case, requires_grad=False)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(26))
    kwargs = dict(causal=True, key_padding_mask=pad)
    seen = seen_mask(layout, q, k, kwargs)
    group = q.shape[1] // k.shape[1]

    def grads(q, k, v, grad):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(sa.sparse_attention(q, k, v, layout, **kwargs), (q, k, v), grad)

    args = {"q": q, "k": k, "v": v, "grad": grad}
    bad = args[operand].clone()
    rows = [5, 37, 61] if operand in ("q", "grad") else [5, 37, 61, 80]
    head = 1 if operand in ("q", "grad") else 0
    for r in rows:
        bad[1, head, r, 3] = value
    clean, poisoned = grads(**args), grads(**{**args, operand: bad})
    affected = torch.zeros(q.shape[:3], dtype=torch.bool)
    if operand in ("q", "grad"):
        affected[1, head, rows] = seen[1, head, rows].any(-1)
    else:
        for h in range(head * group, (head + 1) * group):
            affected[1, h] = seen[1, h][:, rows].any(-1)
    # Keys seen by an affected row, per kv head.
    key_affected = (seen & affected[..., None]).any(2).unflatten(1, (k.shape[1], group)).any(2)
    for name, a, b, hit in zip(("dq", "dk", "dv"), poisoned, clean, (affected, key_affected, key_affected)):
        assert torch.allclose(a[~hit], b[~hit], rtol=1e-5, atol=1e-6), f"{name}: a gradient that does not depend on the bad value changed"
        assert torch.equal(a[0], b[0]), f"{name}: another batch entry changed"
