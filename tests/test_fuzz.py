"""Property-based fuzzing of sa.sparse_attention against the fp64 reference.

Hypothesis draws the shapes (B, H, Hkv, Nq, Nk, D), block size, layout (empty, one block,
full, random density; shared or per head), causal, window, key padding (none, random, a
padded prefix, whole batch entries), dtype and the memory layout of q, k, v (contiguous,
transposed storage, stride-0 broadcasts, strided head_dim); the check is the accuracy rule of
conftest.assert_rule on out, lse, dq, dk and dv.

It runs on the CPU kernels, and on the CUDA ones where the build has them and a GPU is
visible (conftest.require_cuda); there the draws keep to the dtypes, head dims and block sizes
that sa.supported() says the CUDA kernels take.

CI runs the derandomized "quick" profile; the "long" one explores thousands of examples:

    python -m pytest tests/test_fuzz.py --hypothesis-profile=long
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from conftest import check_against_reference, require_module, requires_cuda

hypothesis = require_module("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import sparse_attention as sa  # noqa: E402

# Devices the op is fuzzed on: cuda needs a GPU and the CUDA build (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BLOCK_SIZES = [16, 32, 64, 128, 256]
LAYOUT_KINDS = ["empty", "single", "full", "random"]
PADDINGS = [None, "random", "prefix", "whole_batch"]
# How an operand is laid out in memory (see make_operand).
STORAGES = ["contiguous", "transposed", "broadcast", "strided"]
# Reference cost is about B * H * Nq * Nk * D multiply-adds in fp64, forward and backward.
MAX_WORK = 3e7


@dataclasses.dataclass
class Problem:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    block_size: int
    layout_kind: str
    density: float
    per_head: bool
    causal: bool
    window: tuple | None
    padding: str | None
    dtype: torch.dtype
    storages: tuple
    seed: int


def lengths(long: bool):
    # Short lengths most of the time, straddling block edges; sometimes up to a few thousand.
    if long:
        return st.integers(300, 3000)
    return st.one_of(st.integers(1, 40), st.integers(1, 300), st.sampled_from([15, 16, 17, 63, 64, 65, 255, 256, 257]))


@functools.cache
def kernel_cases(device: str) -> list[tuple[torch.dtype, int, int]]:
    """The (dtype, head_dim, block_size) that the kernels of `device` run, by sa.supported()."""
    cases = [(dtype, head_dim, block_size) for dtype in DTYPES for head_dim in range(1, 257)
             for block_size in BLOCK_SIZES if not sa.supported(device, dtype, head_dim, block_size)]
    assert cases, f"{device}: sa.supported() accepts no case: {sa.supported(device, DTYPES[0], 64, 64)}"
    return cases


@st.composite
def problems(draw, device: str = "cpu") -> Problem:
    long = draw(st.integers(0, 7)) == 0  # long sequences with tiny batch and heads
    q_len, k_len = draw(lengths(long)), draw(lengths(long))
    if long:
        batch, kv_heads, group = 1, 1, draw(st.integers(1, 2))
    else:
        batch, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    heads = kv_heads * group
    # The CPU kernels take any dtype, head dim and block size drawn here; the CUDA ones only
    # some, drawn together from what sa.supported() accepts (and kept: shorter q instead).
    kernel = None if device == "cpu" else draw(st.sampled_from(kernel_cases(device)))
    if kernel is None:
        head_dim = draw(st.one_of(st.sampled_from([1, 8, 16, 32, 64, 100, 128, 256]), st.integers(1, 96)))
    else:
        head_dim = kernel[1]
    while batch * heads * q_len * k_len * head_dim > MAX_WORK:
        if kernel is None:
            head_dim = max(1, head_dim // 2)
        if kernel is not None or (head_dim == 1 and batch * heads * q_len * k_len > MAX_WORK):
            q_len = max(1, q_len // 2)
    left = draw(st.one_of(st.none(), st.integers(0, k_len + 20)))
    right = draw(st.one_of(st.none(), st.integers(0, k_len + 20)))
    window = draw(st.sampled_from([None, (left, right)]))
    return Problem(
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, k_len=k_len, head_dim=head_dim,
        block_size=draw(st.sampled_from(BLOCK_SIZES)) if kernel is None else kernel[2],
        layout_kind=draw(st.sampled_from(LAYOUT_KINDS)),
        density=draw(st.floats(0.0, 1.0)),
        per_head=draw(st.booleans()),
        causal=draw(st.booleans()),
        window=window,
        padding=draw(st.sampled_from(PADDINGS)),
        dtype=draw(st.sampled_from(DTYPES)) if kernel is None else kernel[0],
        storages=tuple(draw(st.sampled_from(STORAGES)) for _ in range(3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_layout(p: Problem, g: torch.Generator) -> sa.BlockLayout:
    shape = (p.heads if p.per_head else 1, math.ceil(p.q_len / p.block_size), math.ceil(p.k_len / p.block_size))
    if p.layout_kind == "empty":
        mask = torch.zeros(shape, dtype=torch.bool)
    elif p.layout_kind == "full":
        mask = torch.ones(shape, dtype=torch.bool)
    elif p.layout_kind == "single":
        mask = torch.zeros(shape, dtype=torch.bool)
        for h in range(shape[0]):
            mask[h, torch.randint(shape[1], (), generator=g), torch.randint(shape[2], (), generator=g)] = True
    else:
        mask = torch.rand(shape, generator=g) < p.density
    return sa.BlockLayout(mask, p.block_size)


def make_padding(p: Problem, g: torch.Generator):
    if p.padding is None:
        return None
    pad = torch.zeros(p.batch, p.k_len, dtype=torch.bool)
    if p.padding == "random":
        pad = torch.rand(p.batch, p.k_len, generator=g) < 0.4
    elif p.padding == "prefix":
        for b in range(p.batch):
            pad[b, : int(torch.randint(p.k_len + 1, (), generator=g))] = True
    else:  # whole batch entries padded: their queries see nothing
        pad[torch.rand(p.batch, generator=g) < 0.6] = True
        pad[0] = True
    return pad


def make_operand(shape, storage: str, dtype, g: torch.Generator, device: str) -> torch.Tensor:
    """A random leaf tensor of `shape` whose memory is laid out as `storage` says."""
    batch, heads, length, dim = shape

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    if storage == "transposed":  # [B, N, H, D] storage viewed as [B, H, N, D]
        t = rand(batch, length, heads, dim).transpose(1, 2)
    elif storage == "broadcast":  # one batch entry and one head, broadcast with stride 0
        t = rand(1, 1, length, dim).expand(batch, heads, length, dim)
    elif storage == "strided":  # every other element of a wider head_dim
        t = rand(batch, heads, length, 2 * dim)[..., ::2]
    else:
        t = rand(batch, heads, length, dim)
    return t.detach().requires_grad_()


def check_problem(p: Problem, device: str) -> None:
    assert not sa.supported(device, p.dtype, p.head_dim, p.block_size), p
    g = torch.Generator().manual_seed(p.seed)
    q = make_operand((p.batch, p.heads, p.q_len, p.head_dim), p.storages[0], p.dtype, g, device)
    k = make_operand((p.batch, p.kv_heads, p.k_len, p.head_dim), p.storages[1], p.dtype, g, device)
    v = make_operand((p.batch, p.kv_heads, p.k_len, p.head_dim), p.storages[2], p.dtype, g, device)
    layout = make_layout(p, g)
    pad = make_padding(p, g)
    grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype=p.dtype, device=device)
    kwargs = dict(causal=p.causal, window=p.window,
                  key_padding_mask=None if pad is None else pad.to(device))
    check_against_reference(q, k, v, layout, kwargs, check_grads=True, grad=grad)


# Examples the long profile once found failing, on the device they failed on, kept so every
# run checks them (a cuda one: pytest.param("cuda", Problem(...), marks=requires_cuda)).
FOUND = [
    # GQA fp16 dv a rounding unit off: the dK/dV pass rounded the scores differently from
    # the forward pass, so P = exp(S - lse) was not exactly 1 for a query's only key.
    ("cpu", Problem(batch=1, heads=6, kv_heads=2, q_len=1, k_len=2, head_dim=100, block_size=16,
                    layout_kind="single", density=0.0, per_head=False, causal=False,
                    window=(0, None), padding=None, dtype=torch.float16,
                    storages=("contiguous",) * 3, seed=2)),
]


@pytest.mark.parametrize(("device", "p"), FOUND, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_found_examples(device, p):
    check_problem(p, device)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_matches_reference(device, data):
    p = data.draw(problems(device), label="problem")  # printed when the example fails
    check_problem(p, device)
