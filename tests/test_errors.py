"""Bad input raises ValueError or TypeError naming the argument; never a crash."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa


def inputs(B=1, H=4, Hkv=2, Nq=40, Nk=40, D=16, dtype=torch.float32):
    return (torch.randn(B, H, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


def layout(heads=1, qb=3, kb=3, bs=16):
    return sa.BlockLayout(torch.ones(heads, qb, kb, dtype=torch.bool), bs)


def call(q=None, k=None, v=None, lay=None, **kwargs):
    dq, dk, dv = inputs()
    return sa.sparse_attention(dq if q is None else q, dk if k is None else k,
                               dv if v is None else v, layout() if lay is None else lay, **kwargs)


CASES = {
    "q rank": (dict(q=torch.randn(4, 40, 16)), ValueError, "q: expected 4 dims"),
    "k rank": (dict(k=torch.randn(1, 2, 40)), ValueError, "k: expected 4 dims"),
    "int dtype": (dict(q=torch.ones(1, 4, 40, 16, dtype=torch.int64)), TypeError, "q: expected float32"),
    "not a tensor": (dict(v=[1.0]), TypeError, "v: expected a torch.Tensor"),
    "mixed dtypes": (dict(q=torch.randn(1, 4, 40, 16, dtype=torch.float64)), TypeError, "one dtype"),
    "k v shapes": (dict(v=torch.randn(1, 2, 41, 16)), ValueError, "k, v: expected the same shape"),
    "batch": (dict(k=torch.randn(2, 2, 40, 16), v=torch.randn(2, 2, 40, 16)), ValueError, "k: expected batch"),
    "head dim": (dict(k=torch.randn(1, 2, 40, 8), v=torch.randn(1, 2, 40, 8)), ValueError, "k: expected head_dim"),
    "gqa": (dict(k=torch.randn(1, 3, 40, 16), v=torch.randn(1, 3, 40, 16)), ValueError, "must divide"),
    "empty seq": (dict(q=torch.randn(1, 4, 0, 16)), ValueError, "empty"),
    "layout type": (dict(lay=torch.ones(1, 3, 3, dtype=torch.bool)), TypeError, "layout: expected a BlockLayout"),
    "layout grid": (dict(lay=layout(qb=4)), ValueError, "layout: a 4 x 3 block grid"),
    "layout heads": (dict(lay=layout(heads=3)), ValueError, "layout: has 3 heads"),
    "pad dtype": (dict(key_padding_mask=torch.zeros(1, 40)), TypeError, "key_padding_mask"),
    "pad shape": (dict(key_padding_mask=torch.zeros(1, 39, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
    "scale": (dict(scale=float("nan")), ValueError, "scale"),
    "window type": (dict(window=5), TypeError, "window"),
    "window value": (dict(window=(-3, 0)), ValueError, "window: left"),
    "cuda kernels": (dict(cuda_kernels="sm90"), ValueError, "cuda_kernels: expected one of 'auto'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_arguments(name):
    kwargs, error, match = CASES[name]
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_head_dim_too_large_for_cpu():
    q, k, v = inputs(D=300)
    with pytest.raises(ValueError, match="head_dim"):
        sa.sparse_attention(q, k, v, layout())


def test_ops_check_their_inputs_directly():
    """The ops are public through torch.ops: they validate lists and shapes themselves."""
    q, k, v = inputs(H=2, Hkv=2)
    lists = layout().block_lists(40, 40, None, torch.device("cpu"))
    fwd = torch.ops.sparse_attention.forward
    fwd(q, k, v, *lists, None, None, None, 16, 0.25, -1, -1)  # valid
    bad_index = lists._replace(row_indices=lists.row_indices.clone().fill_(7))
    with pytest.raises(ValueError, match="out of range"):
        fwd(q, k, v, *bad_index, None, None, None, 16, 0.25, -1, -1)
    repeated = lists._replace(row_indices=torch.tensor([0, 0, 2, 0, 1, 2, 0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="appears twice"):
        fwd(q, k, v, *repeated, None, None, None, 16, 0.25, -1, -1)
    bad_offsets = lists._replace(row_offsets=lists.row_offsets.flip(0).contiguous())
    with pytest.raises(ValueError, match="offsets"):
        fwd(q, k, v, *bad_offsets, None, None, None, 16, 0.25, -1, -1)
    # Claiming a causal-diagonal block is full would skip its mask: refused.
    dense = layout().block_lists(48, 48, None, torch.device("cpu"))
    q48, k48, v48 = inputs(H=2, Hkv=2, Nq=48, Nk=48)
    with pytest.raises(ValueError, match="listed as full"):
        fwd(q48, k48, v48, *dense, None, None, None, 16, 0.25, -1, 0)
    with pytest.raises(ValueError, match="row block lists: expected 4 offsets"):
        fwd(q, k, v, *layout(qb=3).block_lists(40, 40, None, torch.device("cpu"))._replace(
            row_offsets=torch.zeros(3, dtype=torch.int32)), None, None, None, 16, 0.25, -1, -1)
    # The lists' batch and heads come from the full counts' shape [list batch, heads, blocks].
    with pytest.raises(ValueError, match=r"row_num_full: expected \[list batch"):
        fwd(q, k, v, *lists._replace(row_num_full=lists.row_num_full.view(-1)), None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="a layout for 3 batch entries"):
        fwd(q, k, v, *lists._replace(row_num_full=lists.row_num_full.expand(3, -1, -1).contiguous()),
            None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="col_num_full: expected shape"):
        fwd(q, k, v, *lists._replace(col_num_full=lists.col_num_full[:, :, :1].contiguous()), None, None, None,
            16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="q: expected a 4-d"):
        fwd(q[0], k, v, *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(TypeError, match="q: expected float32"):
        fwd(q.long(), k, v, *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="block_size"):
        fwd(q, k, v, *lists, None, None, None, 0, 0.25, -1, -1)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fwd(q, k, v, *lists, torch.zeros(2, 40, dtype=torch.bool), None, None, 16, 0.25, -1, -1)


def test_the_ops_check_the_kernel_choice_on_every_device():
    """cuda_kernels is checked on the CPU too (where it changes nothing), so a typo is caught
    before the code reaches a GPU."""
    q, k, v = inputs(H=2, Hkv=2)
    lists = layout().block_lists(40, 40, None, torch.device("cpu"))
    fwd, bwd = torch.ops.sparse_attention.forward, torch.ops.sparse_attention.backward
    out, lse = fwd(q, k, v, *lists, None, None, None, 16, 0.25, -1, -1)
    for choice in ("auto", "hopper", "mma"):
        again, _ = fwd(q, k, v, *lists, None, None, None, 16, 0.25, -1, -1, cuda_kernels=choice)
        assert torch.equal(again, out)
        bwd(out, None, q, k, v, out, lse, *lists, None, None, None, 16, 0.25, -1, -1, cuda_kernels=choice)
    with pytest.raises(ValueError, match="cuda_kernels: expected 'auto', 'hopper' or 'mma', got 'fast'"):
        fwd(q, k, v, *lists, None, None, None, 16, 0.25, -1, -1, cuda_kernels="fast")
    with pytest.raises(ValueError, match="cuda_kernels"):
        bwd(out, None, q, k, v, out, lse, *lists, None, None, None, 16, 0.25, -1, -1, cuda_kernels="")
    q, k, v = inputs()  # the CPU kernels either way
    assert torch.equal(sa.sparse_attention(q, k, v, layout(), cuda_kernels="hopper"),
                       sa.sparse_attention(q, k, v, layout()))


def test_backward_op_checks_lse():
    q, k, v = inputs(H=2, Hkv=2)
    lists = layout().block_lists(40, 40, None, torch.device("cpu"))
    out, lse = torch.ops.sparse_attention.forward(q, k, v, *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="lse"):
        torch.ops.sparse_attention.backward(out, None, q, k, v, out, lse[:, :, :5], *lists, None, None, None, 16, 0.25, -1, -1)
    with pytest.raises(ValueError, match="out, grad_out"):
        torch.ops.sparse_attention.backward(out[:, :1], None, q, k, v, out, lse, *lists, None, None, None, 16, 0.25, -1, -1)


def test_double_backward_is_refused():
    q, k, v = (t.double().requires_grad_() for t in inputs(H=2, Hkv=2))
    out = sa.sparse_attention(q, k, v, layout())
    (gq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()



def test_unsupported_device(monkeypatch):
    # No second device is present here: pretend the build supports only CUDA.
    from sparse_attention import attention

    monkeypatch.setattr(attention, "SUPPORTED_DEVICE_TYPES", ("cuda",))
    with pytest.raises(ValueError, match="q: tensors on cpu are not supported"):
        call()


def test_inputs_that_look_transposed_are_named_so():
    # [B, N, H, D] instead of [B, H, N, D]: the grid mismatch says the shapes look transposed.
    q = torch.randn(1, 100, 4, 16)
    layout = sa.BlockLayout(torch.ones(1, 7, 7, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match=r"look transposed: the op takes \[batch, heads, seq_len"):
        sa.sparse_attention(q, q, q, layout)
    with pytest.raises(ValueError, match="look transposed"):
        sa.sparse_attention(q, torch.randn(1, 90, 4, 16), torch.randn(1, 90, 4, 16), sa.Local(32, block_size=16))
    decode = torch.randn(1, 4, 1, 16)  # a decoding step: more heads than queries is fine
    with pytest.raises(ValueError) as error:
        sa.sparse_attention(decode, torch.randn(1, 3, 40, 16), torch.randn(1, 3, 40, 16), sa.Local(32, block_size=16))
    assert "transposed" not in str(error.value)
