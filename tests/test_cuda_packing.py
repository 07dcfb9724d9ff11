"""Packed documents on CUDA, against the per-document fp64 reference: one call per document
(the default) and the kernels walking packed lists (packing.CUDA_PACKED_KERNELS, opt-in until
they have passed here). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import packing, patterns
from conftest import requires_cuda
from test_packing import check_packed, offsets, packed_inputs

pytestmark = requires_cuda

LENGTHS = [1, 63, 64, 65, 0, 300, 7, 129]


@pytest.fixture(params=["per_document", "packed_kernels"])
def mode(request, monkeypatch):
    if request.param == "packed_kernels":
        monkeypatch.setenv(packing.CUDA_PACKED_KERNELS, "1")
    return request.param


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_against_reference(mode, dtype, causal, deterministic):
    q, k, v = packed_inputs(LENGTHS, heads=4, kv_heads=2, dim=64, dtype=dtype, seed=3,
                            device="cuda")
    check_packed(q, k, v, patterns.Local(128, block_size=64), offsets(LENGTHS).cuda(),
                 causal=causal, deterministic=deterministic)


def test_keys_laid_out_differently_and_tensor_layouts(mode):
    q_lengths, k_lengths = [64, 128, 0, 5], [192, 128, 7, 5]
    q, k, v = packed_inputs(q_lengths, k_lengths, dim=128, dtype=torch.bfloat16, seed=4,
                            device="cuda")
    check_packed(q, k, v, patterns.Local(128, block_size=64), offsets(q_lengths),
                 offsets(k_lengths), causal=True)
    mask = torch.rand(4, 2, 3, 3, generator=torch.Generator().manual_seed(5)) < 0.6
    check_packed(q, k, v, sa.TensorLayout.from_mask(mask.cuda(), 64), offsets(q_lengths),
                 offsets(k_lengths), causal=True)


def test_packed_kernels_match_the_cpu_kernels(monkeypatch):
    monkeypatch.setenv(packing.CUDA_PACKED_KERNELS, "1")
    q, k, v = (t.detach() for t in packed_inputs(LENGTHS, dim=64, dtype=torch.float16, seed=6))
    cu = offsets(LENGTHS)
    pattern = patterns.Fixed(128, summary=64, block_size=64)
    on_cpu = sa.sparse_attention(q.float(), k.float(), v.float(), pattern, causal=True,
                                 cu_seqlens=cu)
    on_gpu = sa.sparse_attention(q.cuda(), k.cuda(), v.cuda(), pattern, causal=True,
                                 cu_seqlens=cu.cuda())
    assert (on_gpu.float().cpu() - on_cpu).abs().max() < 1e-2


def test_score_terms_one_call_per_document(mode, monkeypatch):
    """Sinks, ALiBi, softcap and the T5 bias with packed documents: one gathered call per
    document (an empty one and one without keys too), against the reference."""
    from test_score_terms import TERMS, check_terms, term_args

    monkeypatch.setattr("sparse_attention.attention._GATHERED_WARNED", set())
    g = torch.Generator().manual_seed(31)
    cu = torch.tensor([0, 40, 40, 113, 150, 200], device="cuda")
    cu_k = torch.tensor([0, 56, 66, 139, 139, 189], device="cuda")
    q = torch.randn(1, 4, 200, 64, generator=g).cuda().half().requires_grad_()
    k, v = (torch.randn(1, 2, 189, 64, generator=g).cuda().half().requires_grad_() for _ in range(2))
    terms = {name: t.cuda().detach().requires_grad_() if isinstance(t, torch.Tensor) else t
             for name, t in term_args([n for n in TERMS if n != "dropout"], 4, 1, 31).items()}
    with pytest.warns(UserWarning, match="sinks: the CUDA kernels do not take it yet"):
        check_terms(q, k, v, sa.Local(64, block_size=64),
                    dict(cu_seqlens=cu, cu_seqlens_k=cu_k, causal=True), terms)
