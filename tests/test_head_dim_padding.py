"""Head dims the CUDA kernels are not compiled for run at the next compiled width, zero-padded;
values of another head dim than q and k (Dv != Dqk) run padded to the larger, on every device.

The padding wraps the kernels' forward (attention._zero_padded_forward) wherever
attention._kernel_head_dim says they run a wider D. On CUDA that is
kernel_table.cuda_kernel_head_dim; here the CPU is made to pad the same way, so the whole
path (scale of the true D, the slice, gradients through the padding, packed documents,
TensorLayouts, GQA, decode steps) is checked against the fp64 reference without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import attention, kernel_table
from conftest import check_against_reference

WIDTHS = (32, 64, 128)


@pytest.fixture
def padded_cpu(monkeypatch):
    """The CPU runs every head dim below 128 at the next of 32, 64, 128, as CUDA does."""
    calls = []

    def kernel_head_dim(device_type, head_dim):
        calls.append(head_dim)
        return next((w for w in WIDTHS if w >= head_dim), head_dim)

    monkeypatch.setattr(attention, "_kernel_head_dim", kernel_head_dim)
    return calls


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def test_cuda_kernel_head_dim_maps_to_the_next_compiled_width():
    assert kernel_table.cuda_kernel_head_dim(8) == 32
    assert kernel_table.cuda_kernel_head_dim(64) == 64
    assert kernel_table.cuda_kernel_head_dim(72) == 128
    assert kernel_table.cuda_kernel_head_dim(96) == 128
    assert kernel_table.cuda_kernel_head_dim(136) is None
    assert all(kernel_table.cuda_kernel_head_dim(d) == d for d in kernel_table.CUDA_HEAD_DIMS)


@pytest.mark.parametrize("head_dim", [8, 40, 80, 96, 120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_head_dims_match_the_reference(padded_cpu, head_dim, dtype):
    """Out, lse, dq, dk, dv: GQA, Nq != Nk with a tail block, key padding, causal."""
    g = torch.Generator().manual_seed(head_dim)
    q = rand(g, 2, 4, 100, head_dim, dtype=dtype)
    k, v = rand(g, 2, 2, 130, head_dim, dtype=dtype), rand(g, 2, 2, 130, head_dim, dtype=dtype)
    pad = torch.zeros(2, 130, dtype=torch.bool)
    pad[1, 90:] = True
    layout = sa.BigBird(num_window_blocks=3, num_global_blocks=1, num_random_blocks=1,
                        block_size=32).layout(100, 130, num_heads=4)
    check_against_reference(q, k, v, layout, dict(causal=True, key_padding_mask=pad))
    assert head_dim in padded_cpu


def test_the_default_scale_is_that_of_the_true_head_dim(padded_cpu):
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(g, 1, 2, 64, 40) for _ in range(3))
    out = sa.sparse_attention(q, k, v, sa.Dense(block_size=32))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == q.shape and out.is_contiguous()


def test_padded_packed_documents_and_tensor_layouts(padded_cpu):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 70, 70, 200], dtype=torch.int32)
    q, k, v = (rand(g, 1, 2, 200, 48) for _ in range(3))
    pattern = sa.Local(64, block_size=32)
    check_against_reference(q, k, v, pattern, dict(causal=True, cu_seqlens=cu))
    mask = torch.rand(1, 2, 4, 4, generator=g) < 0.6
    layout = sa.TensorLayout.from_mask(mask, block_size=32)
    q, k, v = (rand(g, 1, 2, 128, 24) for _ in range(3))
    check_against_reference(q, k, v, layout, dict())


def test_padded_decode_steps_equal_the_full_pass(padded_cpu):
    g = torch.Generator().manual_seed(3)
    q, k, v = (rand(g, 1, 2, 300, 80).detach() for _ in range(3))
    pattern = sa.Longformer(64, block_size=32)
    full = sa.sparse_attention(q, k, v, pattern, causal=True)
    for start in (299, 290, 256):
        step = sa.sparse_attention(q[:, :, start:], k, v, pattern, causal=True)
        torch.testing.assert_close(step, full[:, :, start:], atol=1e-6, rtol=1e-5)


def test_padded_calls_name_mismatched_head_dims(padded_cpu):
    q = torch.randn(1, 2, 64, 40)
    with pytest.raises(ValueError, match="k: expected head_dim 40"):
        sa.sparse_attention(q, torch.randn(1, 2, 64, 48), torch.randn(1, 2, 64, 40),
                            sa.Dense(block_size=32))


def test_padding_compiles_fullgraph(padded_cpu):
    g = torch.Generator().manual_seed(4)
    q, k, v = (rand(g, 1, 2, 96, 40) for _ in range(3))
    pattern = sa.Local(32, block_size=32)
    fn = torch.compile(lambda q, k, v: sa.sparse_attention(q, k, v, pattern, causal=True),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    expected = sa.sparse_attention(q, k, v, pattern, causal=True)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("dims", [(48, 32), (32, 48), (192, 128), (7, 3)], ids=str)
def test_values_of_another_head_dim(dims):
    """Dv != Dqk (MLA prefill: 192 and 128) on the CPU, against the reference: out has Dv."""
    head_dim, value_dim = dims
    g = torch.Generator().manual_seed(head_dim)
    q, k = rand(g, 2, 4, 90, head_dim), rand(g, 2, 2, 120, head_dim)
    v = rand(g, 2, 2, 120, value_dim)
    layout = sa.Longformer(64, block_size=32).layout(90, 120, num_heads=4, causal=True)
    check_against_reference(q, k, v, layout, dict(causal=True))
    cu = torch.tensor([0, 50, 90], dtype=torch.int32)
    q, k, v = q[:1].detach(), k[:1, :, :90].detach(), v[:1, :, :90].detach()
    for t in (q, k, v):
        t.requires_grad_()
    check_against_reference(q, k, v, sa.Local(32, block_size=32), dict(causal=True, cu_seqlens=cu))


def test_padded_asymmetric_values(padded_cpu):
    g = torch.Generator().manual_seed(5)
    q, k, v = rand(g, 1, 2, 100, 40), rand(g, 1, 2, 100, 40), rand(g, 1, 2, 100, 80)
    layout = sa.Local(32, block_size=32).layout(100, 100, num_heads=2, causal=True)
    check_against_reference(q, k, v, layout, dict(causal=True))
    assert 80 in padded_cpu


def test_values_must_match_keys_but_for_the_head_dim():
    q, k = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    with pytest.raises(ValueError, match="k, v: expected the same shape but for the head dim"):
        sa.sparse_attention(q, k, torch.randn(1, 2, 60, 16), sa.Dense(block_size=32))
