"""The block-gathered torch path (sparse_attention.gathered): what runs the CUDA calls the CUDA
kernels are not compiled for (fp32, fp64, block sizes 16 and 32, head dims above 128, older
GPUs) and those with score terms. It is plain torch, so it is checked here on the CPU:
sparse_attention() is made to take it for every call (attention._kernel_reasons), and the
results are held to the fp64 reference under the suite's rule, gradients included, on the hard
cases; its two ops pass opcheck and compile whole."""

from __future__ import annotations

import warnings

import pytest
import torch

import sparse_attention as sa
from sparse_attention import attention, gathered, ops, score_terms
from conftest import check_against_reference, check_rows_without_keys, make_inputs
from test_score_terms import TERMS, check_terms, make_case, term_args


@pytest.fixture
def gathered_path(monkeypatch):
    monkeypatch.setattr(attention, "_kernel_reasons", lambda *args: ("a test's reason",))
    monkeypatch.setattr(attention, "_GATHERED_WARNED", set())
    calls = []
    real = gathered.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(gathered, "forward", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield calls


def rand(g, *shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_gqa_tails_padding_and_per_head_layouts(gathered_path, dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    q = rand(g, 2, 4, 100, 24, dtype=dtype)
    k, v = rand(g, 2, 2, 131, 24, dtype=dtype), rand(g, 2, 2, 131, 24, dtype=dtype)
    pad = torch.zeros(2, 131, dtype=torch.bool)
    pad[1, 70:] = True
    layout = sa.BigBird(num_window_blocks=3, num_global_blocks=1, num_random_blocks=1,
                        per_head=True, block_size=block_size).layout(100, 131, num_heads=4)
    for causal in (False, True):
        check_against_reference(q, k, v, layout, dict(causal=causal, key_padding_mask=pad))
    assert gathered_path


def test_windows_empty_rows_and_tensor_layouts(gathered_path):
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(g, 2, 2, 96, 16) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) < 0.4
    mask[0, 0, 2] = False  # a query block without keys
    layout = sa.TensorLayout.from_mask(mask, 16)
    check_against_reference(q, k, v, layout, dict(window=(20, 5)))
    pad = torch.ones(2, 96, dtype=torch.bool)  # every key padded: all rows empty
    check_rows_without_keys(q, k, v, layout, key_padding_mask=pad)


def test_packed_documents_prefill_chunks_and_decode_steps(gathered_path):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 45, 45, 160], dtype=torch.int32)
    q, k, v = (rand(g, 1, 2, 160, 16) for _ in range(3))
    check_against_reference(q, k, v, sa.Local(40, block_size=32), dict(causal=True, cu_seqlens=cu))
    q, k, v = (rand(g, 1, 2, 200, 16, grad=False) for _ in range(3))
    pattern = sa.Longformer(64, block_size=32)
    full = sa.sparse_attention(q, k, v, pattern, causal=True)
    for start in (199, 180, 150):  # a step, and chunks that start inside a block
        part = sa.sparse_attention(q[:, :, start:], k, v, pattern, causal=True)
        torch.testing.assert_close(part, full[:, :, start:], atol=1e-12, rtol=1e-12)


def test_head_dims_above_the_compiled_ones_and_values_of_another(gathered_path, monkeypatch):
    """Taken as they are: the zero padding is the kernels' (even where they would pad)."""
    monkeypatch.setattr(attention, "_kernel_head_dim", lambda device_type, head_dim: 256)
    g = torch.Generator().manual_seed(3)
    q, k, v = rand(g, 1, 2, 70, 192), rand(g, 1, 2, 70, 192), rand(g, 1, 2, 70, 136)
    layout = sa.Local(32, block_size=16).layout(70, 70, num_heads=2, causal=True)
    check_against_reference(q, k, v, layout, dict(causal=True))
    assert gathered_path[0][-1] == 192


def test_equals_the_cpu_kernels_on_their_lists():
    """gathered.forward on the op's own lists gives the kernels' out and lse (fp64)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (rand(g, 2, 4, 150, 32, grad=False) for _ in range(3))
    layout = sa.BigBird(num_random_blocks=2, per_head=True, block_size=32).layout(150, 150, num_heads=4)
    lists = layout.block_lists(150, 150, sa.window.Window(None, 0), q.device)
    args = dict(key_padding_mask=None, block_size=32, scale=0.2, window=sa.window.Window(None, 0))
    out, lse = gathered.forward(q, k, v, lists, **args)
    ref_out, ref_lse = ops.forward(q, k, v, lists, **args)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_chunks_of_rows_change_nothing(monkeypatch):
    """Rows taken one at a time (a tiny chunk budget) give the same result (to rounding: a
    chunk's rows are padded to its longest, which changes the matmuls' summation)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (rand(g, 1, 2, 128, 16, grad=False) for _ in range(3))
    layout = sa.Longformer(32, block_size=16).layout(128, 128, num_heads=2, causal=True)
    lists = layout.block_lists(128, 128, sa.window.Window(None, 0), q.device)
    args = dict(key_padding_mask=None, block_size=16, scale=0.25, window=sa.window.Window(None, 0))
    whole = gathered.forward(q, k, v, lists, **args)
    monkeypatch.setattr(gathered, "CHUNK_ELEMENTS", 1)
    chunked = gathered.forward(q, k, v, lists, **args)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


def test_the_route_is_said_once_and_hopper_requests_are_refused(monkeypatch):
    monkeypatch.setattr(attention, "_kernel_reasons", lambda *args: ("dtype float32: x",))
    monkeypatch.setattr(attention, "_GATHERED_WARNED", set())
    q = torch.randn(1, 1, 32, 16)
    with pytest.warns(UserWarning, match="dtype float32: x. sparse_attention runs such calls"):
        sa.sparse_attention(q, q, q, sa.Dense(block_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sa.sparse_attention(q, q, q, sa.Dense(block_size=16))
    with pytest.raises(ValueError, match="cuda_kernels: 'hopper' cannot run this call: dtype"):
        sa.sparse_attention(q, q, q, sa.Dense(block_size=16), cuda_kernels="hopper")


@pytest.mark.parametrize("names", [(name,) for name in TERMS] + [TERMS], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_score_terms(gathered_path, names, dtype):
    """Each term and all five against the fp64 reference, with the gradients of the sinks, the
    slopes and the position table; key padding, GQA, per-head layouts, tails."""
    for causal in (False, True):
        case = make_case(dtype, 11 + causal, padding=True, q_len=70, k_len=100)
        q, k, v, layout, pad = make_inputs(case)
        check_terms(q, k, v, layout, dict(causal=causal, key_padding_mask=pad),
                    term_args(names, case.heads, case.batch, 11 + causal))


def test_score_terms_equal_the_cpu_kernels(monkeypatch):
    """With every term (dropout's bits included), out, lse and all gradients equal the CPU
    kernels' in fp64."""
    case = make_case(torch.float64, 5, padding=True, q_len=75, k_len=96)
    q, k, v, layout, pad = make_inputs(case)
    terms = term_args(TERMS, case.heads, case.batch, 5)
    for t in terms.values():
        if isinstance(t, torch.Tensor):
            t.data = t.data.double()
    inputs = (q, k, v) + tuple(t for t in terms.values() if isinstance(t, torch.Tensor))

    def run():
        out, lse = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad,
                                       return_lse=True, **terms)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
        loss = loss + torch.where(torch.isfinite(lse), lse, 0).sum()
        return (out, lse) + torch.autograd.grad(loss, inputs)

    kernels = run()
    monkeypatch.setattr(attention, "_kernel_reasons", lambda *args: ("a test's reason",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = run()
    for a, b in zip(ours, kernels):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_opcheck_forward_and_backward_ops():
    """The two ops' schemas, fake kernels and autograd, with every term and without."""
    case = make_case(torch.float32, 23, batch=2, q_len=50, k_len=70, padding=True)
    q, k, v, layout, pad = make_inputs(case)
    lists = layout.block_lists(case.q_len, case.k_len, sa.window.Window(None, 0), q.device)
    for names in ((), TERMS):
        terms = score_terms.resolve(q, causal=True, **term_args(names, case.heads, 2, 23))
        args = (q, k, v, *lists[:3], pad, 32, 0.25, -1, 0)
        op_args = terms.op_args(50, 70, q.device)
        torch.library.opcheck(torch.ops.sparse_attention.gathered_forward.default, args, op_args)
        grads = (torch.randn(*q.shape[:3], v.shape[3]), torch.randn(q.shape[:3]))
        torch.library.opcheck(torch.ops.sparse_attention.gathered_backward.default,
                              (*grads, *(t.detach() for t in args[:3]), *args[3:]), op_args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_with_terms_and_tensor_layouts(gathered_path, backend):
    """The ops keep their host syncs inside: compiled graphs stay whole and equal eager mode,
    gradients of q, k, v and the sinks included."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(24)
    q, k, v = (rand(g, 2, 4, 100, 16, dtype=torch.float32) for _ in range(3))
    sinks = rand(g, 4, dtype=torch.float32)
    layout = sa.TensorLayout.from_mask(torch.rand(2, 4, 7, 7, generator=g) < 0.5, 16)

    def f(q, k, v, layout, sinks):
        return sa.sparse_attention(q, k, v, layout, causal=True, sinks=sinks, softcap=20.0,
                                   return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=False)
    got, expected = compiled(q, k, v, layout, sinks), f(q, k, v, layout, sinks)
    upstream = (torch.randn_like(got[0]), torch.randn_like(got[1]))
    inputs = (q, k, v, sinks)
    for a, b in zip(got + torch.autograd.grad(got, inputs, upstream),
                    expected + torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
