"""The op inside PyTorch: opcheck, gradcheck, torch.compile(fullgraph=True), autocast."""

from __future__ import annotations

import copy

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from sparse_attention.window import Window
from conftest import Case, make_inputs, max_error


def op_args(case: Case, causal: bool):
    q, k, v, layout, pad = make_inputs(case)
    window = Window(None, 0 if causal else None)
    lists = layout.block_lists(case.q_len, case.k_len, window, q.device)
    return (q, k, v, *lists, pad, None, None, case.block_size, case.head_dim**-0.5, *window.kernel_bounds())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_forward(causal, dtype):
    case = Case(batch=2, heads=4, kv_heads=2, q_len=50, k_len=70, density=0.5, per_head=True,
                padding=True, dtype=dtype, seed=21)
    torch.library.opcheck(torch.ops.sparse_attention.forward.default, op_args(case, causal))


def test_opcheck_backward():
    case = Case(heads=2, kv_heads=1, q_len=50, k_len=50, density=0.6, padding=True, seed=22)
    args = op_args(case, causal=True)
    with torch.no_grad():
        out, lse = torch.ops.sparse_attention.forward(*args)
    q, k, v = (t.detach() for t in args[:3])
    back = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *args[3:])
    torch.library.opcheck(torch.ops.sparse_attention.backward.default, back)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fp64(causal):
    case = Case(batch=1, heads=2, kv_heads=1, q_len=20, k_len=36, head_dim=8, block_size=16,
                density=0.7, padding=True, dtype=torch.float64, seed=23)
    q, k, v, layout, pad = make_inputs(case)

    def f(q, k, v):
        out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=pad,
                                       return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


class Block(torch.nn.Module):
    """A tiny attention block using the op, as a user model would."""

    def __init__(self, dim=32, heads=2, layout=None):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.layout = layout

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = sa.sparse_attention(q, k, v, self.layout, causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layout = sa.BlockLayout(torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.6, 16)
    model = Block(layout=layout)
    x = torch.randn(2, 100, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    y_eager = model(x)
    y_eager.square().sum().backward()
    eager_grads = [p.grad for p in model.parameters()] + [x.grad]
    assert max_error(y, y_eager) < 1e-5
    for a, b in zip(grads, eager_grads):
        assert max_error(a, b) < 1e-4


def test_compile_new_length_recompiles_with_right_lists():
    torch._dynamo.reset()
    layout_a = sa.BlockLayout(torch.ones(1, 4, 4, dtype=torch.bool), 16)

    @torch.compile(fullgraph=True, dynamic=False)
    def f(q, k, v, layout):
        return sa.sparse_attention(q, k, v, layout, causal=True)

    for n in (64, 50):  # same grid, different length: different partial blocks
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        assert max_error(f(q, k, v, layout_a), reference.attention(q, k, v, layout_a, causal=True)) < 1e-5



def test_compile_each_pattern_object_gets_its_graph():
    # A graph is guarded on the pattern object it was built for: another pattern, or a copy,
    # recompiles. Under dynamic shapes the patterns' exact token windows, which choose the
    # block lists, must stay constants of the graph.
    torch._dynamo.reset()
    narrow = sa.Local(20, block_size=16, exact=True)
    wide = sa.Local(48, block_size=16, exact=True)

    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def f(q, k, v, pattern):
        return sa.sparse_attention(q, k, v, pattern, causal=True)

    g = torch.Generator().manual_seed(25)
    q, k, v = (torch.randn(2, 2, 100, 16, generator=g) for _ in range(3))
    for pattern in (narrow, wide, copy.deepcopy(narrow), wide):
        exact = reference.attention(q, k, v, pattern.layout(100, causal=True), causal=True,
                                    window=pattern.token_window)
        assert max_error(f(q, k, v, pattern), exact) < 1e-5

def test_autocast_cpu_bf16():
    case = Case(q_len=64, k_len=64, density=0.8, seed=24)
    q, k, v, layout, _ = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sa.sparse_attention(q, k, v, layout, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    exact = reference.attention(q, k, v, layout, causal=True)
    assert max_error(out, exact) < 5e-2


def test_autocast_takes_mixed_precision_and_leaves_float64_alone():
    case = Case(q_len=64, k_len=64, density=0.8, seed=25)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fp32 queries and keys (a rotary embedding computed in fp32) with bf16 values
        mixed = sa.sparse_attention(q, k, v.bfloat16(), layout, causal=True)
        double = sa.sparse_attention(q.double(), k.double(), v.double(), layout, causal=True)
    assert mixed.dtype == torch.bfloat16 and double.dtype == torch.float64
    exact = reference.attention(q.double(), k.double(), v.double(), layout, causal=True)
    assert max_error(mixed, exact) < 5e-2
    assert max_error(double, exact) < 1e-12
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        sa.sparse_attention(q, k, v.bfloat16(), layout)  # outside autocast, mixed is an error


def test_compile_dynamic_shapes_and_layout_arguments():
    torch._dynamo.reset()
    dense = sa.BlockLayout(torch.ones(1, 4, 4, dtype=torch.bool), 16)
    diagonal = sa.BlockLayout(torch.eye(4, dtype=torch.bool)[None], 16)

    @torch.compile(fullgraph=True, dynamic=True)
    def f(q, k, v, layout):
        return sa.sparse_attention(q, k, v, layout, causal=True)

    for batch, n, layout in ((2, 64, dense), (2, 60, dense), (3, 55, dense), (2, 64, diagonal),
                             (2, 64, dense)):
        q, k, v = (torch.randn(batch, 2, n, 16) for _ in range(3))
        assert max_error(f(q, k, v, layout), reference.attention(q, k, v, layout, causal=True)) < 1e-5


def test_two_eager_constants_returning_tensors_share_a_graph():
    from sparse_attention.compile_constants import KnownById, eager_constant

    class Holder(KnownById):
        pass

    @eager_constant
    def first(holder, n):
        return torch.arange(n)

    @eager_constant
    def second(holder, n):
        return torch.ones(n)

    holder = Holder()
    compiled = torch.compile(lambda x: (x + first(holder, 3)) * second(holder, 3), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(torch.zeros(3)), torch.tensor([0.0, 1.0, 2.0]))
