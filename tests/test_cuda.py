"""The CUDA kernels against the fp64 reference: the CPU suite's cases moved to the GPU (head
dims and block sizes rounded up to ones the CUDA kernels take), fp16 and bf16, gradients
with atomic and deterministic dQ, bit-identical deterministic runs, and the CUDA-only errors.
Skipped without a GPU; with a GPU but a build without CUDA kernels, skipped outside CI and
failed under CI=true (conftest.require_cuda)."""

from __future__ import annotations

import zlib

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from conftest import (Case, assert_rule, fresh_memory_filled_with_nan, make_inputs, max_error, requires_cuda,
                      run_case)
from test_correctness import LONG, SHAPES

# Skipped without a GPU; a GPU with a build that lacks CUDA kernels fails under CI=true.
pytestmark = requires_cuda

CUDA_DTYPES = [torch.float16, torch.bfloat16]
WINDOW_CASES = [
    Case(q_len=300, k_len=300, block_size=64, density=0.8, window=window, seed=7)
    for window in [(64, 0), (10, 10), (None, 5), (0, None)]
] + [Case(q_len=150, k_len=400, block_size=64, density=1.0, causal=True, window=(100, None), seed=8)]
EDGE_CASES = [
    Case(q_len=120, k_len=40, density=1.0, causal=True, seed=12),  # first rows see nothing
    Case(batch=2, heads=4, kv_heads=2, q_len=111, k_len=77, density=0.3, per_head=True,
         causal=True, padding=True, seed=14),
    Case(heads=4, kv_heads=1, q_len=1, k_len=700, density=1.0, causal=True, seed=30),  # decode
    Case(heads=3, kv_heads=3, q_len=129, k_len=129, block_size=128, density=0.0, seed=31),  # empty
]


def on_cuda(case: Case, dtype: torch.dtype, seed_salt: str = "") -> Case:
    """The case on the GPU, with the smallest head dim and block size the kernels take that
    are at least the case's."""
    head_dim = next(d for d in (32, 64, 128, case.head_dim) if case.head_dim <= d)
    block_size = 64 if case.block_size <= 64 else 128
    seed = zlib.crc32(f"{case}{dtype}{seed_salt}".encode())
    return Case(**{**case.__dict__, "head_dim": min(head_dim, 128), "block_size": block_size,
                   "dtype": dtype, "device": "cuda", "seed": seed})


ALL_CASES = SHAPES + LONG + WINDOW_CASES + EDGE_CASES


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_against_reference(case, dtype, deterministic):
    run_case(on_cuda(case, dtype), deterministic=deterministic)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
def test_every_head_dim_and_block_size(head_dim, block_size):
    for dtype in CUDA_DTYPES:
        run_case(Case(batch=2, heads=4, kv_heads=2, q_len=517, k_len=390, head_dim=head_dim,
                      block_size=block_size, density=0.4, per_head=True, causal=True,
                      padding=True, dtype=dtype, device="cuda", seed=head_dim + block_size))


@pytest.mark.parametrize("head_dim", [8, 40, 72, 80, 96, 120])
def test_head_dims_between_the_compiled_ones_run_zero_padded(head_dim):
    for dtype in CUDA_DTYPES:
        run_case(Case(batch=2, heads=4, kv_heads=2, q_len=300, k_len=333, head_dim=head_dim,
                      block_size=64, density=0.5, causal=True, padding=True, dtype=dtype,
                      device="cuda", seed=head_dim))


def test_deterministic_mode_is_bit_identical():
    case = Case(batch=2, heads=8, kv_heads=2, q_len=1500, k_len=1500, head_dim=64, block_size=64,
                density=0.5, per_head=True, causal=True, dtype=torch.bfloat16, device="cuda", seed=40)
    q, k, v, layout, _ = make_inputs(case)
    grad = torch.randn_like(q)

    def run():
        out = sa.sparse_attention(q, k, v, layout, causal=True, deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_every_output_element_is_written():
    case = Case(batch=2, heads=4, kv_heads=2, q_len=333, k_len=200, head_dim=64, block_size=64,
                density=0.3, per_head=True, causal=True, padding=True, dtype=torch.float16,
                device="cuda", seed=41)
    q, k, v, layout, pad = make_inputs(case)
    with fresh_memory_filled_with_nan():
        for deterministic in (False, True):
            out, lse = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad,
                                           return_lse=True, deterministic=deterministic)
            grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            for t in (out, lse, *grads):
                assert not torch.isnan(t).any()


def test_matches_the_cpu_kernels():
    case = Case(batch=1, heads=4, kv_heads=2, q_len=300, k_len=300, head_dim=64, block_size=64,
                density=0.5, causal=True, padding=True, dtype=torch.bfloat16, device="cuda", seed=42)
    q, k, v, layout, pad = make_inputs(case, requires_grad=False)
    gpu = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad)
    cpu = sa.sparse_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), layout, causal=True,
                              key_padding_mask=pad.cpu())
    assert max_error(gpu.cpu(), cpu) < 3e-2


def test_autocast_runs_fp32_inputs_in_half_precision():
    case = Case(q_len=200, k_len=200, head_dim=64, block_size=64, density=0.6, dtype=torch.float32,
                device="cuda", seed=43)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sa.sparse_attention(q, k, v, layout, causal=True)
    assert out.dtype == torch.bfloat16
    exact = reference.attention(q.double(), k.double(), v.double(), layout, causal=True)
    low = reference.attention(q, k, v, layout, causal=True, compute_dtype=torch.bfloat16)
    assert_rule("out", out, low.to(torch.bfloat16), exact)


def test_non_contiguous_inputs():
    case = Case(batch=2, heads=2, kv_heads=2, q_len=190, k_len=190, head_dim=64, block_size=64,
                density=0.6, dtype=torch.float16, device="cuda", seed=44)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] storage
    k_e = k[:1].expand(2, -1, -1, -1)                     # broadcast batch
    v_s = torch.randn(2, 2, 190, 128, device="cuda", dtype=v.dtype)[..., ::2]  # stride 2
    out = sa.sparse_attention(q_t, k_e, v_s, layout, causal=True)
    exact = reference.attention(q_t.double(), k_e.double(), v_s.double(), layout, causal=True)
    low = reference.attention(q_t, k_e, v_s, layout, causal=True, compute_dtype=torch.float16)
    assert_rule("out", out, low.to(torch.float16), exact)


# Calls the CUDA kernels are not compiled for run on the block-gathered torch path, with a
# warning naming the reason, and match the reference as the kernels' calls do.
GATHERED_CASES = {
    "fp32": (dict(dtype=torch.float32), r"dtype float32: .*float16, bfloat16"),
    "fp64": (dict(dtype=torch.float64), r"dtype float64"),
    "head dim": (dict(head_dim=192), r"head_dim 192: the CUDA kernels take 1 to 128"),
    "block size 16": (dict(block_size=16), r"block_size 16: the CUDA kernels take 64, 128"),
    "block size 32": (dict(block_size=32), r"block_size 32: the CUDA kernels take 64, 128"),
}


@pytest.mark.parametrize("name", list(GATHERED_CASES))
def test_calls_the_kernels_do_not_take_run_gathered(name, monkeypatch):
    changes, match = GATHERED_CASES[name]
    monkeypatch.setattr("sparse_attention.attention._GATHERED_WARNED", set())
    case = Case(**{**Case(batch=2, heads=4, kv_heads=2, q_len=300, k_len=333, head_dim=64,
                          block_size=64, density=0.4, per_head=True, causal=True, padding=True,
                          dtype=torch.float16, device="cuda", seed=len(name)).__dict__, **changes})
    with pytest.warns(UserWarning, match=match):
        run_case(case)


def test_score_terms_run_gathered(monkeypatch):
    from test_score_terms import TERMS, check_terms, make_case, term_args

    monkeypatch.setattr("sparse_attention.attention._GATHERED_WARNED", set())
    case = make_case(torch.float16, 3, device="cuda", q_len=200, k_len=260, padding=True,
                     block_size=64)
    q, k, v, layout, pad = make_inputs(case)
    terms = {name: t.detach().cuda().requires_grad_() if isinstance(t, torch.Tensor) else t
             for name, t in term_args(TERMS, case.heads, case.batch, 3).items()}
    with pytest.warns(UserWarning, match="sinks: the CUDA kernels do not take it yet"):
        check_terms(q, k, v, layout, dict(causal=True, key_padding_mask=pad), terms)


def test_hopper_kernels_asked_for_a_call_they_cannot_run():
    q = torch.randn(1, 2, 128, 64, device="cuda")  # float32
    with pytest.raises(ValueError, match="cuda_kernels: 'hopper' cannot run this call: dtype float32"):
        sa.sparse_attention(q, q, q, sa.Dense(block_size=64), cuda_kernels="hopper")


@pytest.mark.parametrize("layout_heads", [1, 2, 4])
@pytest.mark.parametrize("layout_batch", [1, 2])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_tensor_layouts_batched_and_per_kv_head(layout_batch, layout_heads, deterministic):
    """Lists built on the device from a TensorLayout, with a batch index and GQA-shared heads."""
    case = Case(batch=2, heads=4, kv_heads=2, q_len=300, k_len=333, head_dim=64, block_size=64,
                causal=True, padding=True, dtype=torch.bfloat16, device="cuda", seed=layout_heads)
    q, k, v, _, pad = make_inputs(case)
    g = torch.Generator().manual_seed(layout_batch * 10 + layout_heads)
    mask = (torch.rand(layout_batch, layout_heads, 5, 6, generator=g) < 0.5).cuda()
    layout = sa.TensorLayout.from_mask(mask, 64)
    from conftest import check_against_reference
    check_against_reference(q, k, v, layout, dict(causal=True, key_padding_mask=pad),
                            deterministic=deterministic)


@pytest.mark.parametrize("q_len", [1, 2, 16, 64])
@pytest.mark.parametrize("kernels", ["mma", "hopper"])
def test_split_kv_decoding(q_len, kernels, monkeypatch):
    """Calls of at most 64 queries split long rows across thread blocks (split_rows, opt-in):
    out, lse and gradients against the reference, the unsplit call, and batch invariance."""
    if kernels == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")
    from conftest import check_against_reference
    from sparse_attention import split_rows

    monkeypatch.setenv(split_rows.CUDA_SPLIT_ENV, "1")
    if kernels == "hopper":  # the environment, as the reference takes no cuda_kernels
        monkeypatch.setenv("SPARSE_ATTENTION_HOPPER_KERNELS", "1")
    g = torch.Generator().manual_seed(q_len)
    block = 128 if kernels == "hopper" else 64

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16).requires_grad_(grad)

    q, k, v = rand(2, 8, q_len, 128), rand(2, 2, 20000, 128), rand(2, 2, 20000, 128)
    pad = torch.zeros(2, 20000, dtype=torch.bool, device="cuda")
    pad[1, 5000:9000] = True
    pattern = sa.Longformer(8192, block_size=block)
    layout = pattern.layout(q_len, 20000, num_heads=8, causal=True)
    slots, num_slots = [], split_rows.num_slots
    monkeypatch.setattr(split_rows, "num_slots", lambda *args: slots.append(num_slots(*args)) or slots[-1])
    call = dict(causal=True, key_padding_mask=pad)
    check_against_reference(q, k, v, layout, call)
    assert max(slots) == 16
    with torch.no_grad():
        split = sa.sparse_attention(q, k, v, pattern, **call)
        single = torch.cat([sa.sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern, causal=True,
                                                key_padding_mask=pad[b:b + 1]) for b in range(2)])
        assert torch.equal(split, single)
        monkeypatch.delenv(split_rows.CUDA_SPLIT_ENV)
        whole = sa.sparse_attention(q, k, v, pattern, **call)
    assert max_error(split, whole) < 2e-2


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_block_size_256_runs_as_blocks_of_128(deterministic, monkeypatch):
    """On the kernels (support.cuda_run_block_size), not the gathered path: no warning."""
    import warnings

    from conftest import check_against_reference

    monkeypatch.setattr("sparse_attention.attention._GATHERED_WARNED", set())
    case = Case(batch=2, heads=4, kv_heads=2, q_len=600, k_len=700, head_dim=64, block_size=256,
                density=0.6, per_head=True, causal=True, padding=True, dtype=torch.bfloat16,
                device="cuda", seed=256)
    q, k, v, layout, pad = make_inputs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_reference(q, k, v, layout, dict(causal=True, key_padding_mask=pad),
                                deterministic=deterministic)
