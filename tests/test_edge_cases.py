"""Empty rows, empty layouts, padding, strides, grad of lse, determinism, every element written."""

from __future__ import annotations

import torch

import sparse_attention as sa
from sparse_attention import reference
from conftest import (Case, assert_rule, check_rows_without_keys, fresh_memory_filled_with_nan, make_inputs,
                      max_error, run_case)


def test_empty_layout_gives_zeros_and_zero_grads():
    q, k, v, _, _ = make_inputs(Case(q_len=70, k_len=90, seed=11))
    layout = sa.BlockLayout(torch.zeros(1, 5, 6, dtype=torch.bool), 16)
    check_rows_without_keys(q, k, v, layout)


def test_queries_before_the_diagonal_see_nothing():
    # Nq > Nk with causal: the first Nq - Nk queries see no key.
    run_case(Case(q_len=120, k_len=40, block_size=16, density=1.0, causal=True, seed=12))
    q, k, v, layout, _ = make_inputs(Case(q_len=120, k_len=40, block_size=16, density=1.0, seed=12))
    out, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    assert (out[:, :, :80] == 0).all() and torch.isneginf(lse[:, :, :80]).all()
    assert torch.isfinite(lse[:, :, 80:]).all()


def test_fully_padded_batch_entry():
    q, k, v, layout, _ = make_inputs(Case(batch=2, q_len=50, k_len=50, density=1.0, seed=13))
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1] = True
    out = sa.sparse_attention(q, k, v, layout, key_padding_mask=pad)
    assert (out[1] == 0).all()
    exact = reference.attention(q, k, v, layout, key_padding_mask=pad)
    assert max_error(out, exact) < 1e-5
    out.sum().backward()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all() and (q.grad[1] == 0).all()


def test_every_output_element_is_written():
    case = Case(batch=2, heads=4, kv_heads=2, q_len=111, k_len=77, density=0.3, per_head=True,
                causal=True, padding=True, seed=14)
    q, k, v, layout, pad = make_inputs(case)
    with fresh_memory_filled_with_nan():
        out, lse = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad,
                                       return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()


def test_non_contiguous_and_expanded_inputs():
    case = Case(batch=2, heads=2, kv_heads=2, q_len=90, k_len=90, head_dim=32, density=0.6, seed=15)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    # [B, N, H, D] storage viewed as [B, H, N, D]; a broadcast (stride-0) batch for k;
    # a head_dim slice with stride 2.
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    k_e = k[:1].expand(2, -1, -1, -1).detach().requires_grad_()
    v_wide = torch.randn(2, 2, 90, 64, dtype=v.dtype)
    v_s = v_wide[..., ::2].requires_grad_()
    assert not q_t.is_contiguous() and k_e.stride(0) == 0 and v_s.stride(-1) == 2
    out = sa.sparse_attention(q_t, k_e, v_s, layout, causal=True)
    exact = reference.attention(q_t, k_e, v_s, layout, causal=True)
    assert max_error(out, exact) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q_t, k_e, v_s))
    exact_grads = torch.autograd.grad(exact.square().sum(), (q_t, k_e, v_s))
    for a, b in zip(grads, exact_grads):
        assert max_error(a, b) < 1e-4


def test_gradient_through_lse():
    case = Case(q_len=80, k_len=100, density=0.5, causal=True, dtype=torch.float64, seed=16)
    q, k, v, layout, _ = make_inputs(case)
    out, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    r_out, r_lse = reference.attention(q, k, v, layout, causal=True, return_lse=True)
    seen = torch.isfinite(r_lse)
    loss = (out * 0.5).sum() + lse[seen].square().sum()
    r_loss = (r_out * 0.5).sum() + r_lse[seen].square().sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(r_loss, (q, k, v))):
        assert max_error(a, b) < 1e-9


def test_custom_scale():
    case = Case(q_len=64, k_len=64, density=0.7, dtype=torch.float64, seed=17)
    q, k, v, layout, _ = make_inputs(case)
    out = sa.sparse_attention(q, k, v, layout, scale=0.05)
    assert max_error(out, reference.attention(q, k, v, layout, scale=0.05)) < 1e-12


def test_deterministic_across_runs_and_thread_counts():
    case = Case(heads=4, kv_heads=1, q_len=300, k_len=300, head_dim=64, density=0.4,
                per_head=True, causal=True, seed=18)
    q, k, v, layout, _ = make_inputs(case)
    grad = torch.randn(q.shape)
    threads = torch.get_num_threads()

    def run():
        out = sa.sparse_attention(q, k, v, layout, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_shared_and_per_head_layouts_agree():
    case = Case(heads=3, kv_heads=1, q_len=100, k_len=100, density=0.5, seed=19)
    q, k, v, shared, _ = make_inputs(case)
    per_head = sa.BlockLayout(shared.mask.expand(3, -1, -1), shared.block_size)
    a = sa.sparse_attention(q, k, v, shared, causal=True)
    b = sa.sparse_attention(q, k, v, per_head, causal=True)
    assert torch.equal(a, b)


def test_large_logits_do_not_overflow():
    case = Case(q_len=100, k_len=100, density=1.0, seed=20)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v, layout, _ = make_inputs(Case(**{**case.__dict__, "dtype": dtype}), requires_grad=False)
        q = (q.float() * 30).to(dtype)
        out = sa.sparse_attention(q, k, v, layout, causal=True)
        exact = reference.attention(q, k, v, layout, causal=True)
        low = reference.attention(q.float(), k.float(), v.float(), layout, causal=True,
                                  compute_dtype=torch.float32).to(dtype)
        assert torch.isfinite(out).all()
        assert_rule("out", out, low, exact)


def test_deterministic_flag_reaches_the_backward_op(monkeypatch):
    # The CPU kernels ignore it (they are always deterministic); CUDA picks its dQ pass by it.
    import sparse_attention.ops as ops_module

    real, seen = ops_module._ops, []

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def backward(self, **kwargs):
            seen.append(kwargs["deterministic"])
            return real.backward(**kwargs)

    monkeypatch.setattr(ops_module, "_ops", Recorder())
    q, k, v, layout, _ = make_inputs(Case(q_len=50, k_len=50, density=0.6, seed=21))
    grads = {}
    for deterministic in (False, True):
        out = sa.sparse_attention(q, k, v, layout, causal=True, deterministic=deterministic)
        grads[deterministic] = torch.autograd.grad(out.sum(), (q, k, v))
    assert seen == [False, True]
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
