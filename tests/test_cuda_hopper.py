"""The Hopper kernels (csrc/cuda/hopper: TMA, wgmma, warp-specialized; opt-in with
SPARSE_ATTENTION_HOPPER_KERNELS=1 or cuda_kernels="hopper"), forward and backward, against the
fp64 reference and against the mma.sync kernels on the same inputs. Runs on a compute
capability 9.0 GPU with a build that has sm_90a code; skipped elsewhere (without a GPU through
conftest.requires_cuda).

benchmarks/gpu_check.sh runs this file before tests/test_cuda.py, with -x: a profiler check
that the Hopper kernels really ran comes first, so that a silent fallback cannot pass for a
pass, then single tiles, forward before backward."""

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


def hopper_kernels_that_ran(head_dim: int, **kwargs) -> set[str]:
    """Which of the Hopper forward and backward kernels a forward + backward call ran."""
    q, k, v, layout, _ = make_inputs(on_gpu(CASES[0], head_dim, torch.bfloat16))

    def run():
        out = sa.sparse_attention(q, k, v, layout, causal=True, **kwargs)
        out.backward(torch.ones_like(out))

    names = cuda_kernel_names(run)
    return {kernel for kernel in ("forward_sm90_kernel", "backward_sm90_kernel")
            if any(kernel in name for name in names)}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_hopper_kernels_run_when_asked(head_dim, monkeypatch):
    both = {"forward_sm90_kernel", "backward_sm90_kernel"}
    monkeypatch.delenv(HOPPER_KERNELS, raising=False)
    assert hopper_kernels_that_ran(head_dim) == set(), "the Hopper kernels ran without being asked for"
    assert hopper_kernels_that_ran(head_dim, cuda_kernels="hopper") == both, \
        "cuda_kernels='hopper' did not run both (a build without sm_90a code?)"
    monkeypatch.setenv(HOPPER_KERNELS, "1")
    assert hopper_kernels_that_ran(head_dim) == both, f"{HOPPER_KERNELS}=1 did not run both"
    assert hopper_kernels_that_ran(head_dim, cuda_kernels="mma") == set(), \
        "cuda_kernels='mma' did not keep the Hopper kernels out"


def test_asking_for_the_hopper_kernels_where_they_cannot_run_is_an_error():
    q, k, v, layout, _ = make_inputs(on_gpu(Case(q_len=256, k_len=256, block_size=64), 64,
                                            torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match="cuda_kernels='hopper'.*block_size 128"):
        sa.sparse_attention(q, k, v, layout, cuda_kernels="hopper")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_one_tile(hopper, head_dim, causal):
    """One query block against one key block: TMA, both wgmmas and the softmax without the
    list walk's variety (unmasked, then masked). Runs before the others (gpu_check.sh: -x)."""
    case = Case(q_len=128, k_len=128, block_size=128, density=1.0, causal=causal, seed=10)
    run_case(on_gpu(case, head_dim, torch.bfloat16), check_grads=False)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_pass"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_one_tile_backward(hopper, head_dim, causal, deterministic):
    """The backward of one key block against one query block (two 64-row steps): both dK/dV
    products, dS through shared memory and the dQ product (or the dQ pass)."""
    case = Case(q_len=128, k_len=128, block_size=128, density=1.0, causal=causal, seed=11)
    run_case(on_gpu(case, head_dim, torch.bfloat16), deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_reference(hopper, case, head_dim, dtype):
    run_case(on_gpu(case, head_dim, dtype))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_forward_without_pingpong(hopper, case, head_dim, monkeypatch):
    """The forward's consumer warpgroups without their turns (a tuning switch) give the same."""
    monkeypatch.setenv("SPARSE_ATTENTION_HOPPER_PINGPONG", "0")
    run_case(on_gpu(case, head_dim, torch.bfloat16), check_grads=False)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES[:6:2], ids=str)
def test_deterministic_backward(hopper, case, head_dim):
    """deterministic=True: the dK/dV kernel without dQ, then the dQ pass: against the
    reference, and bit-identical run to run."""
    case = on_gpu(case, head_dim, torch.bfloat16)
    run_case(case, deterministic=True)
    q, k, v, layout, pad = make_inputs(case)
    grads = []
    for _ in range(2):
        out = sa.sparse_attention(q, k, v, layout, causal=case.causal, key_padding_mask=pad,
                                  window=case.window, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_mma_sync_kernels(case, head_dim, dtype):
    q, k, v, layout, pad = make_inputs(on_gpu(case, head_dim, dtype))
    kwargs = dict(causal=case.causal, key_padding_mask=pad, window=case.window, return_lse=True)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)

    def run(kernels):
        out, lse = sa.sparse_attention(q, k, v, layout, cuda_kernels=kernels, **kwargs)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), grad))

    out, lse, *grads = run("mma")
    hopper_out, hopper_lse, *hopper_grads = run("hopper")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(hopper_lse)), "lse: -inf rows differ"
    seen = torch.isfinite(lse)
    assert (hopper_lse[seen] - lse[seen]).abs().max().item() < 1e-3 if seen.any() else True
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3  # both round P to the input dtype
    assert (hopper_out.float() - out.float()).abs().max().item() < tolerance
    for name, ours, theirs in zip(("dq", "dk", "dv"), hopper_grads, grads):
        scale = theirs.float().abs().max().item() or 1.0  # gradients sum over many rows
        assert (ours.float() - theirs.float()).abs().max().item() < 4 * tolerance * scale, name


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
