"""TensorLayout: per-call, batched layouts as device tensors, against the fp64 reference.

Batched and shared layouts, per query head, per kv head (GQA groups share one) and shared;
empty rows, all-empty layouts, K = 1 and K = num_k_blocks, repeated indices, unused entries,
padding, windows, tails, gradients; the lists equal the C++ builder's; building them makes
no host sync; torch.compile keeps the layout a graph input (no recompile on new values).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference

from sparse_attention.tensor_layout import static_block_lists
from sparse_attention.window import Window

from conftest import host_syncs, require_module

B, H, HKV, D, BS = 2, 4, 2, 16, 16


def qkv(q_len=100, k_len=100, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return rand(B, H, q_len, D), rand(B, HKV, k_len, D), rand(B, HKV, k_len, D)


def check_against_reference(q, k, v, layout, atol=1e-10, **kwargs):
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    want, want_lse = reference.attention(q, k, v, layout, return_lse=True, **kwargs)
    torch.testing.assert_close(out, want, atol=atol, rtol=0)
    seen = want_lse > float("-inf")
    torch.testing.assert_close(lse[seen], want_lse[seen].to(lse.dtype), atol=atol, rtol=0)
    assert torch.isneginf(lse[~seen]).all() and (out.detach()[~seen] == 0).all()
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("layout_batch", [1, B])
@pytest.mark.parametrize("layout_heads", [1, HKV, H])
@pytest.mark.parametrize("causal", [False, True])
def test_mask_layouts_match_the_reference(layout_batch, layout_heads, causal):
    q, k, v = qkv(q_len=90, k_len=130, seed=layout_heads)
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(layout_batch, layout_heads, 6, 9, generator=g) < 0.4
    mask[0, 0, 2] = False  # an empty row
    check_against_reference(q, k, v, sa.TensorLayout.from_mask(mask, BS), causal=causal)


def test_padding_windows_and_an_all_empty_layout():
    q, k, v = qkv(q_len=100, k_len=100, seed=3)
    mask = torch.rand(B, H, 7, 7, generator=torch.Generator().manual_seed(1)) < 0.6
    pad = torch.rand(B, 100, generator=torch.Generator().manual_seed(2)) < 0.3
    pad[1, :40] = True
    layout = sa.TensorLayout.from_mask(mask, BS)
    check_against_reference(q, k, v, layout, key_padding_mask=pad, window=(20, 5))
    check_against_reference(q, k, v, layout, causal=True, key_padding_mask=pad, window=(30, None))
    empty = sa.TensorLayout.from_mask(torch.zeros(1, 1, 7, 7, dtype=torch.bool), BS)
    out = sa.sparse_attention(q, k, v, empty)
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


def test_index_layouts_equal_their_masks():
    q, k, v = qkv(q_len=100, k_len=120, seed=4)
    g = torch.Generator().manual_seed(5)
    kb = math.ceil(120 / BS)
    # K = num_k_blocks with repeats, negatives and entries past counts unused.
    indices = torch.randint(-2, kb, (B, HKV, 7, kb), generator=g)
    counts = torch.randint(0, kb + 1, (B, HKV, 7), generator=g)
    layout = sa.TensorLayout.from_indices(indices, BS, kb, counts=counts)
    expected = torch.zeros(B, HKV, 7, kb, dtype=torch.bool)
    for idx in torch.cartesian_prod(torch.arange(B), torch.arange(HKV), torch.arange(7)).tolist():
        b, h, r = idx
        for e in indices[b, h, r, :counts[b, h, r]].tolist():
            if e >= 0:
                expected[b, h, r, e] = True
    assert torch.equal(layout.mask, expected)
    check_against_reference(q, k, v, layout, causal=True)
    # K = 1, one key block per row, given in any order across rows.
    single = sa.TensorLayout.from_indices(torch.randint(0, kb, (1, H, 7, 1), generator=g), BS, kb)
    assert (single.mask.sum(-1) == 1).all()
    check_against_reference(q, k, v, single)


def test_index_errors_name_the_argument():
    with pytest.raises(ValueError, match="indices: block 9 is outside the 8 key blocks"):
        sa.TensorLayout.from_indices(torch.tensor([[[[1, 9]]]]), BS, 8)
    with pytest.raises(ValueError, match="indices: K = 3 entries per row exceed num_k_blocks = 2"):
        sa.TensorLayout.from_indices(torch.zeros(1, 1, 1, 3, dtype=torch.long), BS, 2)
    with pytest.raises(TypeError, match="indices: expected an integer tensor"):
        sa.TensorLayout.from_indices(torch.zeros(1, 1, 1, 3), BS, 4)
    with pytest.raises(ValueError, match="counts: expected shape"):
        sa.TensorLayout.from_indices(torch.zeros(1, 1, 2, 3, dtype=torch.long), BS, 4,
                                     counts=torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        sa.TensorLayout.from_mask(torch.zeros(1, 1, 2, 2), BS)
    with pytest.raises(ValueError, match=r"mask: expected a non-empty bool tensor \[B or 1"):
        sa.TensorLayout.from_mask(torch.zeros(2, 2, dtype=torch.bool), BS)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout: has 3 heads; expected 1"):
        sa.sparse_attention(q, k, v, sa.TensorLayout.from_mask(torch.ones(1, 3, 7, 7, dtype=torch.bool), BS))
    with pytest.raises(ValueError, match="layout: a layout for 3 batch entries"):
        sa.sparse_attention(q, k, v, sa.TensorLayout.from_mask(torch.ones(3, 1, 7, 7, dtype=torch.bool), BS))
    with pytest.raises(ValueError, match="layout: a 7 x 6 block grid does not fit"):
        sa.sparse_attention(q, k, v, sa.TensorLayout.from_mask(torch.ones(1, 1, 7, 6, dtype=torch.bool), BS))


@pytest.mark.parametrize("q_len, k_len, window", [(100, 100, (None, None)), (70, 130, (None, 0)),
                                                  (64, 64, (10, 3)), (130, 70, (None, 0))])
def test_lists_equal_the_cpu_builders(q_len, k_len, window):
    # The static-shape builder (GPUs, compiled graphs) against the C++ one, which eager CPU
    # calls of TensorLayout and every BlockLayout use.
    qb, kb = math.ceil(q_len / BS), math.ceil(k_len / BS)
    mask = torch.rand(2, 3, qb, kb, generator=torch.Generator().manual_seed(q_len)) < 0.5
    ours = static_block_lists(mask, q_len, k_len, BS, Window.of(window))
    theirs = sa.TensorLayout.from_mask(mask, BS).block_lists(q_len, k_len, window)
    assert torch.equal(theirs.row_num_full, sa.BlockLayout(mask.flatten(0, 1), BS).block_lists(
        q_len, k_len, window, torch.device("cpu")).row_num_full.view(2, 3, qb))
    assert_same_lists(ours, theirs)


def assert_same_lists(ours, theirs):
    for name in ("row", "col"):
        offsets, num_full = getattr(ours, f"{name}_offsets"), getattr(ours, f"{name}_num_full")
        assert torch.equal(offsets, getattr(theirs, f"{name}_offsets"))
        assert torch.equal(num_full, getattr(theirs, f"{name}_num_full"))
        used = int(offsets[-1])
        # Full entries first, each part ascending: the same lists entry for entry.
        assert torch.equal(getattr(ours, f"{name}_indices")[:used], getattr(theirs, f"{name}_indices"))


def test_building_lists_never_syncs_with_the_host(monkeypatch):
    mask = torch.rand(B, H, 7, 7) < 0.5
    with host_syncs(monkeypatch) as calls:
        static_block_lists(mask, 100, 100, BS, Window(None, 0))
    assert calls == []


def test_compiled_function_building_a_layout_per_call_never_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def attend(q, k, v, mask):
        layout = sa.TensorLayout.from_mask(mask, BS)
        return sa.sparse_attention(q, k, v, layout, causal=True)

    q, k, v = (t.detach() for t in qkv(seed=9))
    g = torch.Generator().manual_seed(11)
    for i in range(10):
        mask = torch.rand(B, HKV, 7, 7, generator=g) < 0.3 + 0.05 * i
        out = attend(q, k, v, mask)
        want = reference.attention(q, k, v, sa.TensorLayout.from_mask(mask, BS), causal=True)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    assert counter.frame_count == 1


def test_compiled_backward_through_an_index_layout():
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss(q, k, v, indices):
        layout = sa.TensorLayout.from_indices(indices, BS, 7)
        return sa.sparse_attention(q, k, v, layout).square().sum()

    q, k, v = qkv(seed=12)
    indices = torch.randint(0, 7, (1, H, 7, 3), generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(loss(q, k, v, indices), (q, k, v))
    layout = sa.TensorLayout.from_indices(indices, BS, 7)
    want = torch.autograd.grad(reference.attention(q, k, v, layout).square().sum(), (q, k, v))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


hypothesis = require_module("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    q_len=st.integers(1, 70), k_len=st.integers(1, 70), layout_batch=st.sampled_from([1, B]),
    layout_heads=st.sampled_from([1, HKV, H]), density=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
    causal=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_fuzz_tensor_layouts(q_len, k_len, layout_batch, layout_heads, density, causal, padded,
                             seed, dtype):
    q, k, v = qkv(q_len, k_len, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(layout_batch, layout_heads, math.ceil(q_len / BS), math.ceil(k_len / BS),
                      generator=g) < density
    pad = (torch.rand(B, k_len, generator=g) < 0.3) if padded else None
    layout = sa.TensorLayout.from_mask(mask, BS)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    check_against_reference(q, k, v, layout, atol=atol, causal=causal, key_padding_mask=pad)
    window = Window(None, 0 if causal else None)
    assert_same_lists(static_block_lists(mask, q_len, k_len, BS, window),
                      layout.block_lists(q_len, k_len, window))


def test_modules_and_models_take_a_layout_per_call():
    from sparse_attention.models import SparseTransformerConfig, SparseTransformerLM
    from sparse_attention.nn import SparseMultiheadAttention, SparseSelfAttention

    torch.manual_seed(0)
    pattern = sa.Local(32, block_size=BS) | sa.Global(num_blocks=1, block_size=BS)
    same = sa.TensorLayout.from_mask(pattern.layout(100, causal=True).mask.unsqueeze(0).expand(B, -1, -1, -1), BS)
    module = SparseMultiheadAttention(32, 4, batch_first=True, pattern=pattern, sdpa_max_len=0,
                                      dtype=torch.float64)
    x = torch.randn(B, 100, 32, dtype=torch.float64)
    expected = module(x, x, x, is_causal=True)[0]
    torch.testing.assert_close(module(x, x, x, is_causal=True, layout=same)[0], expected,
                               atol=1e-12, rtol=0)
    deepspeed = SparseSelfAttention(sa.FixedSparsityConfig(num_heads=H, block=BS))
    q, k, v = (t.detach() for t in qkv())
    per_input = sa.TensorLayout.from_mask(torch.rand(B, 1, 7, 7) < 0.5, BS)
    torch.testing.assert_close(deepspeed(q, k, v, layout=per_input),
                               sa.sparse_attention(q, k, v, per_input), atol=1e-12, rtol=0)

    config = SparseTransformerConfig(vocab_size=40, max_seq_len=128, d_model=32, num_layers=2,
                                     num_heads=4, block_size=BS, pattern="local", sdpa_max_len=0)
    model = SparseTransformerLM(config).eval()
    ids = torch.randint(0, 40, (B, 100))
    its_own = model.transformer.blocks[0].attn.dispatch.pattern.layout(100, num_heads=4, causal=True)
    same = sa.TensorLayout.from_mask(its_own.mask.unsqueeze(0), BS)
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(model(ids, layout=same).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, layout=[same, same]).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layout: expected one per layer"):
        model(ids, layout=[same])
