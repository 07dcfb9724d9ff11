"""The Hopper forward (csrc/cuda/hopper: TMA, wgmma, warp-specialized; opt-in with
SPARSE_ATTENTION_HOPPER_KERNELS=1) against the fp64 reference and against the mma.sync
kernels on the same inputs. Runs on a compute capability 9.0 GPU with a build that has sm_90a
code; skipped elsewhere (without a GPU through conftest.requires_cuda). The backward still
runs on the mma.sync kernels, from the Hopper forward's out and lse.

benchmarks/gpu_check.sh runs this file before tests/test_cuda.py: a profiler check that the
Hopper kernel really ran comes first, so that a silent fallback cannot pass for a pass."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import packing, patterns
from conftest import Case, check_against_reference, make_inputs, requires_cuda, run_case
from test_packing import check_packed, offsets, packed_inputs

HOPPER_KERNELS = "SPARSE_ATTENTION_HOPPER_KERNELS"


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [requires_cuda,
              pytest.mark.skipif(not _on_hopper(), reason="needs a compute capability 9.0 GPU")]

DTYPES = [torch.float16, torch.bfloat16]
# Block size 128 (the Hopper forward's only one), head dims 64 and 128: tails, empty rows,
# GQA, per-head and per-batch layouts, padding with whole padded blocks, windows.
CASES = [
    Case(q_len=1024, k_len=1024, block_size=128, density=1.0, causal=True),
    Case(q_len=1000, k_len=1000, block_size=128, density=1.0, causal=True),
    Case(q_len=700, k_len=700, block_size=128, density=1.0, window=(200, 0)),
    Case(q_len=513, k_len=900, block_size=128, density=0.4, seed=3),  # empty rows likely
    Case(heads=4, kv_heads=2, q_len=640, k_len=640, block_size=128, density=0.6, per_head=True,
         causal=True, seed=4),
    Case(batch=2, heads=2, kv_heads=1, q_len=300, k_len=520, block_size=128, density=0.7,
         padding=True, seed=5),
    Case(heads=2, kv_heads=2, q_len=129, k_len=129, block_size=128, density=0.0, seed=6),
    Case(heads=4, kv_heads=1, q_len=1, k_len=700, block_size=128, density=1.0, causal=True,
         seed=7),
]


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setenv(HOPPER_KERNELS, "1")


def on_gpu(case: Case, head_dim: int, dtype: torch.dtype) -> Case:
    return Case(**{**case.__dict__, "head_dim": head_dim, "dtype": dtype, "device": "cuda"})


def cuda_kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_hopper_kernel_runs_when_asked(head_dim, monkeypatch):
    q, k, v, layout, _ = make_inputs(on_gpu(CASES[0], head_dim, torch.bfloat16), requires_grad=False)
    run = lambda: sa.sparse_attention(q, k, v, layout, causal=True)  # noqa: E731
    monkeypatch.setenv(HOPPER_KERNELS, "1")
    assert any("forward_sm90_kernel" in name for name in cuda_kernel_names(run)), \
        "the Hopper forward did not run (a build without sm_90a code?)"
    monkeypatch.delenv(HOPPER_KERNELS)
    assert not any("forward_sm90_kernel" in name for name in cuda_kernel_names(run)), \
        "the Hopper forward ran without being asked for"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_one_tile(hopper, head_dim, causal):
    """One query block against one key block: TMA, both wgmmas and the softmax without the
    list walk's variety (unmasked, then masked). Runs before the others (gpu_check.sh: -x)."""
    case = Case(q_len=128, k_len=128, block_size=128, density=1.0, causal=causal, seed=10)
    run_case(on_gpu(case, head_dim, torch.bfloat16), check_grads=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_reference(hopper, case, head_dim, dtype):
    run_case(on_gpu(case, head_dim, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_mma_sync_kernels(case, head_dim, dtype, monkeypatch):
    q, k, v, layout, pad = make_inputs(on_gpu(case, head_dim, dtype), requires_grad=False)
    kwargs = dict(causal=case.causal, key_padding_mask=pad, window=case.window, return_lse=True)
    out, lse = sa.sparse_attention(q, k, v, layout, **kwargs)
    monkeypatch.setenv(HOPPER_KERNELS, "1")
    hopper_out, hopper_lse = sa.sparse_attention(q, k, v, layout, **kwargs)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(hopper_lse)), "lse: -inf rows differ"
    seen = torch.isfinite(lse)
    assert (hopper_lse[seen] - lse[seen]).abs().max().item() < 1e-3 if seen.any() else True
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3  # both round P to the input dtype
    assert (hopper_out.float() - out.float()).abs().max().item() < tolerance


@pytest.mark.parametrize("packed_kernels", [False, True], ids=["per_document", "packed_kernels"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_packed_documents(hopper, head_dim, packed_kernels, monkeypatch):
    if packed_kernels:
        monkeypatch.setenv(packing.CUDA_PACKED_KERNELS, "1")
    lengths = [1, 127, 128, 129, 0, 300, 7, 257]
    q, k, v = packed_inputs(lengths, heads=4, kv_heads=2, dim=head_dim, dtype=torch.bfloat16,
                            seed=8, device="cuda")
    check_packed(q, k, v, patterns.Local(256, block_size=128), offsets(lengths).cuda(), causal=True)


def test_non_contiguous_and_broadcast_operands(hopper):
    """Transposed views go through TMA with their own strides; a kv broadcast over heads
    (stride 0) takes the mma.sync kernel. Both against the reference."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 300, 2, 128, generator=g).cuda().bfloat16().transpose(1, 2)
    k = torch.randn(1, 300, 2, 128, generator=g).cuda().bfloat16().transpose(1, 2)
    v = torch.randn(1, 300, 2, 128, generator=g).cuda().bfloat16().transpose(1, 2)
    layout = patterns.Local(256, block_size=128)
    check_against_reference(q, k, v, layout, dict(causal=True), check_grads=False)
    broadcast = v[:, :1].expand(1, 2, 300, 128)
    check_against_reference(q, k, broadcast, layout, dict(causal=True), check_grads=False)
