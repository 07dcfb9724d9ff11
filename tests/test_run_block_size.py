"""Layouts whose block size the CUDA kernels do not take as it is but that a compiled block size
divides (256; 128 at head dim 128 on GPUs of 99 KB of shared memory) run as blocks of that size,
every layout block as its sub-blocks (support.cuda_run_block_size, layout.finer_mask).

On CUDA attention._kernel_block_size says so; here the CPU kernels are made to run the finer
lists the same way, so the lists, every path into them (BlockLayouts, patterns with their
prefill chunks and decode steps, TensorLayouts, packed documents, compiled graphs) and the
gradients are checked against the fp64 reference of the layout as given.
"""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import attention, layout as layout_module, reference, support
from conftest import check_against_reference

FINER = 16  # the CPU runs every layout of a larger block size as blocks of 16


@pytest.fixture
def finer_cpu(monkeypatch):
    """The CPU runs layouts of blocks above 16 as blocks of 16; returns the calls' sizes."""
    calls = []

    def kernel_block_size(q, v, block_size):
        calls.append(block_size)
        return FINER if block_size > FINER else block_size

    monkeypatch.setattr(attention, "_kernel_block_size", kernel_block_size)
    return calls


def rand(g, *shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


def test_the_run_block_size_of_each_gpu():
    run = support.cuda_run_block_size
    assert run(128, 128, capability=(9, 0)) == 128
    assert run(128, 256, capability=(9, 0)) == 128
    assert run(64, 256, capability=(8, 0)) == 128
    assert run(128, 128, capability=(8, 6)) == 64  # the dQ pass at block 128 needs 128 KB
    assert run(128, 256, capability=(12, 0)) == 64
    assert run(64, 128, capability=(8, 9)) == 128
    assert run(96, 128, capability=(8, 6)) == 64  # runs at head dim 128
    assert run(64, 128) == 128  # no GPU named: the shared memory is not checked
    assert run(64, 16, capability=(9, 0)) is None and run(64, 32) is None
    assert run(200, 128, capability=(9, 0)) is None


@pytest.mark.parametrize("q_len, k_len", [(128, 128), (100, 250), (1, 300), (257, 3)])
def test_finer_masks_cover_the_same_token_pairs(q_len, k_len):
    g = torch.Generator().manual_seed(q_len + k_len)
    block, run = 64, 16
    mask = torch.rand(3, -(-q_len // block), -(-k_len // block), generator=g) < 0.5
    fine = layout_module.finer_mask(mask, block, run, q_len, k_len)
    assert fine.shape == (3, -(-q_len // run), -(-k_len // run))
    for causal in (False, True):
        coarse_elements = reference.element_mask(sa.BlockLayout(mask, block), q_len, k_len, causal=causal)
        fine_elements = reference.element_mask(sa.BlockLayout(fine, run), q_len, k_len, causal=causal)
        assert torch.equal(coarse_elements, fine_elements)
    with pytest.raises(ValueError, match="run_block_size: 48 does not divide block_size 64"):
        layout_module.finer_mask(mask, block, 48, q_len, k_len)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_block_layouts_match_the_reference(finer_cpu, dtype):
    """Per-head layouts, GQA, tails, key padding, causal, a window; gradients too."""
    g = torch.Generator().manual_seed(1)
    q = rand(g, 2, 4, 150, 16, dtype=dtype)
    k, v = rand(g, 2, 2, 190, 16, dtype=dtype), rand(g, 2, 2, 190, 16, dtype=dtype)
    pad = torch.zeros(2, 190, dtype=torch.bool)
    pad[1, 140:] = True
    layout = sa.BigBird(num_random_blocks=1, per_head=True, block_size=64).layout(150, 190, num_heads=4)
    check_against_reference(q, k, v, layout, dict(causal=True, key_padding_mask=pad))
    check_against_reference(q, k, v, layout, dict(window=(70, 20)))
    assert finer_cpu == [64, 64]


def test_patterns_prefill_chunks_and_decode_steps_equal_the_full_pass(finer_cpu):
    """A causal pattern's chunk that starts inside one of its blocks still gets that block's
    whole-sequence rows (the pieces follow the pattern's block size, not the finer one)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand(g, 1, 2, 300, 16, grad=False) for _ in range(3))
    pattern = sa.Longformer(96, block_size=64)
    full = sa.sparse_attention(q, k, v, pattern, causal=True)
    expected = reference.attention(q, k, v, pattern.layout(300, 300, num_heads=2, causal=True),
                                   causal=True)
    torch.testing.assert_close(full, expected, atol=1e-12, rtol=1e-12)
    for start in (299, 290, 250, 200):  # steps, and chunks that start inside a block
        part = sa.sparse_attention(q[:, :, start:], k, v, pattern, causal=True)
        torch.testing.assert_close(part, full[:, :, start:], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout_heads", [1, 2, 4])
def test_tensor_layouts_batched_and_per_kv_head(finer_cpu, layout_heads):
    g = torch.Generator().manual_seed(3 + layout_heads)
    q, k, v = rand(g, 2, 4, 100, 16), rand(g, 2, 2, 130, 16), rand(g, 2, 2, 130, 16)
    mask = torch.rand(2, layout_heads, 4, 5, generator=g) < 0.5
    mask[0, 0, 1] = False  # a query block without keys
    check_against_reference(q, k, v, sa.TensorLayout.from_mask(mask, 32), dict(causal=True))


def test_packed_documents_run_one_call_each(finer_cpu):
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 70, 70, 200], dtype=torch.int32)
    q, k, v = (rand(g, 1, 2, 200, 16) for _ in range(3))
    check_against_reference(q, k, v, sa.Local(64, block_size=32), dict(causal=True, cu_seqlens=cu))
    mask = torch.rand(3, 2, 5, 5, generator=g) < 0.6
    check_against_reference(q, k, v, sa.TensorLayout.from_mask(mask, 32), dict(cu_seqlens=cu))
    assert finer_cpu


def test_finer_blocks_compile_fullgraph(finer_cpu):
    g = torch.Generator().manual_seed(5)
    q, k, v = (rand(g, 1, 2, 130, 16, dtype=torch.float32) for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=g) < 0.7
    pattern = sa.Local(64, block_size=64)
    for layout, call in ((sa.TensorLayout.from_mask(mask, 64), {}), (pattern, dict(causal=True))):
        fn = torch.compile(lambda q, k, v, layout=layout: sa.sparse_attention(q, k, v, layout, **call),
                           fullgraph=True, backend="aot_eager")
        out = fn(q, k, v)
        torch.testing.assert_close(out, sa.sparse_attention(q, k, v, layout, **call))
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


def test_block_layouts_cache_their_lists_per_run_block_size():
    layout = sa.Dense(block_size=64).layout(200, 200)
    coarse = layout.block_lists(200, 200, None, torch.device("cpu"))
    fine = layout.block_lists(200, 200, None, torch.device("cpu"), run_block_size=16)
    assert fine.row_num_full.shape == (1, 1, 13) and coarse.row_num_full.shape == (1, 1, 4)
    assert layout.block_lists(200, 200, None, torch.device("cpu"), 16) is fine
    assert layout.block_lists(200, 200, None, torch.device("cpu"), 64) is coarse
