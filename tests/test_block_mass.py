"""sa.block_attention_mass: the softmax mass of every block pair, against dense fp64 weights.

The weights P are computed densely here from the element mask and the reference's lse, then
summed per block: GQA, causal, padding, windows, tails, empty rows, TensorLayouts batched and
shared, BlockLayouts and Patterns (also a causal call starting inside a block); rows of
queries that see a key sum to 1; recall of a select_blocks layout against dense attention;
chunked computation; compiled with fullgraph; no host sync; argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import sparse_attention as sa

from conftest import host_syncs
from sparse_attention import block_mass, reference
from sparse_attention.element_rules import element_mask

B, H, HKV, D, BS = 2, 4, 2, 16, 16


def qkv(q_len=100, k_len=100, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return rand(B, H, q_len, D), rand(B, HKV, k_len, D), rand(B, HKV, k_len, D)


def dense_mass(q, k, v, layout, **kwargs):
    """[B, H, qb, kb] from the dense fp64 weights P = exp(S - lse) on the element mask, with
    the lse of reference.attention."""
    q_len, k_len = q.shape[2], k.shape[2]
    _, lse = reference.attention(q, k, v, layout, return_lse=True, **kwargs)
    scale = kwargs.pop("scale", None) or 1 / math.sqrt(D)
    mask = element_mask(layout, q_len, k_len, device=q.device, **kwargs)
    if mask.shape[1] not in (1, H):
        mask = mask.repeat_interleave(H // mask.shape[1], dim=1)
    kk = k.double().repeat_interleave(H // k.shape[1], dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    seen = torch.isfinite(lse).unsqueeze(-1)
    probs = torch.where(mask & seen, torch.exp(scores - torch.where(seen, lse.unsqueeze(-1), 0.0)), 0.0)
    qb, kb = math.ceil(q_len / BS), math.ceil(k_len / BS)
    probs = torch.nn.functional.pad(probs, (0, kb * BS - k_len, 0, qb * BS - q_len))
    return probs.view(B, H, qb, BS, kb, BS).sum((3, 5))


def queries_per_block(q_len):
    qb = math.ceil(q_len / BS)
    return torch.tensor([min(BS, q_len - r * BS) for r in range(qb)], dtype=torch.float64)


def check(q, k, v, layout, atol=1e-6, **kwargs):
    """Our mass (with the op's lse) against the dense one; row sums against the lse."""
    _, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    mass = sa.block_attention_mass(q, k, layout, lse, **kwargs)
    q_len, k_len = q.shape[2], k.shape[2]
    assert mass.dtype == torch.float32
    assert mass.shape == (B, H, math.ceil(q_len / BS), math.ceil(k_len / BS))
    if not isinstance(layout, sa.Pattern):
        torch.testing.assert_close(mass.double(), dense_mass(q, k, v, layout, **kwargs),
                                   atol=atol, rtol=0)
        blocks = layout.mask if isinstance(layout, sa.TensorLayout) else layout.mask.unsqueeze(0)
        if blocks.shape[1] not in (1, H):
            blocks = blocks.repeat_interleave(H // blocks.shape[1], dim=1)
        assert (mass.masked_fill(blocks.expand_as(mass), 0) == 0).all()  # no mass off the layout
    # Per row: the queries of the block that see a key (all of them: 1 after dividing).
    sees = torch.isfinite(lse).double()
    sees = torch.nn.functional.pad(sees, (0, mass.shape[2] * BS - q_len)).view(*mass.shape[:3], BS)
    torch.testing.assert_close(mass.double().sum(-1), sees.sum(-1), atol=1e-5, rtol=0)
    return mass, lse


@pytest.mark.parametrize("layout_batch", [1, B])
@pytest.mark.parametrize("layout_heads", [1, HKV, H])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_layouts_batched_and_shared(layout_batch, layout_heads, causal):
    q, k, v = qkv(q_len=90, k_len=130, seed=layout_heads + layout_batch)
    mask = torch.rand(layout_batch, layout_heads, 6, 9, generator=torch.Generator().manual_seed(7)) < 0.5
    mask[0, 0, 2] = False  # an empty row: lse -inf, mass 0
    check(q, k, v, sa.TensorLayout.from_mask(mask, BS), causal=causal)


def test_rows_that_see_a_key_sum_to_one():
    q, k, v = qkv(q_len=100, k_len=100, seed=1)
    mask = torch.rand(B, HKV, 7, 7, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[..., 0] = True  # every row sees key block 0
    layout = sa.TensorLayout.from_mask(mask, BS)
    _, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
    mass = sa.block_attention_mass(q, k, layout, lse)
    torch.testing.assert_close(mass.sum(-1) / queries_per_block(100).float(),
                               torch.ones(B, H, 7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len, k_len", [(100, 100), (37, 150), (150, 37), (1, 70), (70, 1),
                                          (33, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_tails_and_causal_with_empty_rows(q_len, k_len, causal):
    q, k, v = qkv(q_len=q_len, k_len=k_len, seed=q_len * k_len)
    qb, kb = math.ceil(q_len / BS), math.ceil(k_len / BS)
    mask = torch.rand(B, H, qb, kb, generator=torch.Generator().manual_seed(3)) < 0.6
    mass, lse = check(q, k, v, sa.TensorLayout.from_mask(mask, BS), causal=causal)
    # Queries before the first key (Nq > Nk, causal) and empty rows: lse -inf, mass 0.
    assert (mass.sum(-1)[~mask.any(-1)] == 0).all()


def test_padding_and_windows():
    q, k, v = qkv(q_len=100, k_len=120, seed=4)
    mask = torch.rand(B, HKV, 7, 8, generator=torch.Generator().manual_seed(5)) < 0.6
    pad = torch.rand(B, 120, generator=torch.Generator().manual_seed(6)) < 0.3
    pad[1, :50] = True  # whole padded blocks
    layout = sa.TensorLayout.from_mask(mask, BS)
    check(q, k, v, layout, key_padding_mask=pad)
    check(q, k, v, layout, key_padding_mask=pad, causal=True, window=(30, None))
    check(q, k, v, layout, window=(20, 5), scale=0.3)


def test_block_layouts_and_patterns():
    q, k, v = qkv(q_len=100, k_len=100, seed=8)
    g = torch.Generator().manual_seed(9)
    for heads in (1, H):
        block = sa.BlockLayout(torch.rand(heads, 7, 7, generator=g) < 0.5, BS)
        check(q, k, v, block, causal=True)
        check(q, k, v, block)
    for pattern in (sa.Local(2 * BS, block_size=BS), sa.BigBird(block_size=BS, seed=1, per_head=True),
                    sa.Dense(BS)):
        for causal in (False, True):
            mass, _ = check(q, k, v, pattern, causal=causal)
            want = dense_mass(q, k, v, pattern.layout(100, 100, num_heads=H, causal=causal),
                              causal=causal)
            torch.testing.assert_close(mass.double(), want, atol=1e-6, rtol=0)


def test_pattern_with_a_token_window_and_a_causal_call_starting_inside_a_block():
    # Local(..., exact=True) narrows the window to its tokens; Nk - Nq = 40 is not a multiple
    # of the block, so the op runs the causal call in two pieces: each query gets its row.
    q, k, v = qkv(q_len=60, k_len=100, seed=10)
    for pattern in (sa.Local(24, block_size=BS, exact=True), sa.Local(2 * BS, block_size=BS),
                    sa.BigBird(block_size=BS, seed=2)):
        mass, lse = check(q, k, v, pattern, causal=True)
        assert torch.isfinite(lse).all()
        torch.testing.assert_close(mass.sum(-1) / queries_per_block(60).float(),
                                   torch.ones(B, H, 4), atol=1e-5, rtol=0)


def test_recall_of_a_selected_layout_against_dense_attention():
    q, k, v = qkv(q_len=128, k_len=128, seed=11)
    for causal in (False, True):
        _, lse = sa.sparse_attention(q, k, v, sa.Dense(BS), causal=causal, return_lse=True)
        mass = sa.block_attention_mass(q, k, sa.Dense(BS), lse, causal=causal)
        selected = sa.select_blocks(q, k, BS, top_k=2, causal=causal)
        kept = selected.mask.repeat_interleave(H // HKV, dim=1)
        recall = (mass * kept).sum((-1, -2)) / 128  # [B, H]: mean over query rows
        # Dense: the weights of dense attention on the selected blocks' elements.
        dense = dense_mass(q, k, v, sa.Dense(BS).layout(128, 128, causal=causal), causal=causal)
        torch.testing.assert_close(recall.double(), (dense * kept).sum((-1, -2)) / 128,
                                   atol=1e-6, rtol=0)
        assert ((recall > 0) & (recall < 1)).all()
        everything = sa.TensorLayout.from_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), BS)
        full = (mass * everything.mask).sum((-1, -2)) / 128
        torch.testing.assert_close(full, torch.ones(B, H), atol=1e-5, rtol=0)


def test_chunks_of_rows_give_the_same_mass(monkeypatch):
    q, k, v = qkv(q_len=100, k_len=130, seed=12)
    mask = torch.rand(1, H, 7, 9, generator=torch.Generator().manual_seed(13)) < 0.5
    layout = sa.TensorLayout.from_mask(mask, BS)
    pad = torch.rand(B, 130, generator=torch.Generator().manual_seed(14)) < 0.2
    _, lse = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad, return_lse=True)
    whole = sa.block_attention_mass(q, k, layout, lse, causal=True, key_padding_mask=pad)
    for elements in (1, B * H * BS * 130 * 2, B * H * BS * 130 * 3):  # 1, 2 and 3 rows a chunk
        monkeypatch.setattr(block_mass, "CHUNK_ELEMENTS", elements)
        torch.testing.assert_close(
            sa.block_attention_mass(q, k, layout, lse, causal=True, key_padding_mask=pad),
            whole, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs(dtype):
    q, k, v = qkv(q_len=100, k_len=100, seed=15, dtype=dtype)
    mask = torch.rand(B, HKV, 7, 7, generator=torch.Generator().manual_seed(16)) < 0.5
    mask[..., 0] = True
    layout = sa.TensorLayout.from_mask(mask, BS)
    _, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    mass = sa.block_attention_mass(q, k, layout, lse, causal=True)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), dense_mass(q, k, v, layout, causal=True),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_mass_never_syncs_with_the_host(monkeypatch):
    q, k, v = qkv(seed=17)
    layout = sa.TensorLayout.from_mask(torch.rand(B, HKV, 7, 7) < 0.5, BS)
    pad = torch.rand(B, 100) < 0.2
    _, lse = sa.sparse_attention(q, k, v, layout, causal=True, key_padding_mask=pad, return_lse=True)
    with host_syncs(monkeypatch) as calls:
        sa.block_attention_mass(q, k, layout, lse, causal=True, key_padding_mask=pad, window=(40, None))
    assert calls == []


def test_compiled_with_fullgraph():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    pattern = sa.BigBird(block_size=BS, seed=3, per_head=True)
    block = sa.BlockLayout(torch.rand(1, 7, 8, generator=torch.Generator().manual_seed(4)) < 0.5, BS)

    def masses(q, k, v, mask):
        results = []
        for layout in (sa.TensorLayout.from_mask(mask, BS), pattern, block):
            _, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True)
            results.append(sa.block_attention_mass(q, k, layout, lse, causal=True))
        return results

    compiled = torch.compile(masses, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(18)
    for seed in range(3):
        q, k, v = qkv(q_len=100, k_len=120, seed=30 + seed)
        mask = torch.rand(B, HKV, 7, 8, generator=g) < 0.5
        for got, want in zip(compiled(q, k, v, mask), masses(q, k, v, mask)):
            torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    assert counter.frame_count == 1


def test_bad_arguments_name_the_argument():
    q, k, v = qkv(seed=19)
    layout = sa.TensorLayout.from_mask(torch.ones(1, 1, 7, 7, dtype=torch.bool), BS)
    _, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        sa.block_attention_mass(q, k, layout, lse[:, :2])
    with pytest.raises(TypeError, match="lse"):
        sa.block_attention_mass(q, k, layout, None)
    with pytest.raises(TypeError, match="lse"):
        sa.block_attention_mass(q, k, layout, lse.long())
    with pytest.raises(TypeError, match="layout"):
        sa.block_attention_mass(q, k, "dense", lse)
    with pytest.raises(ValueError, match="layout"):
        sa.block_attention_mass(q, k[:, :, :50], layout, lse)
    with pytest.raises(ValueError, match="scale"):
        sa.block_attention_mass(q, k, layout, lse, scale=float("nan"))
    with pytest.raises(ValueError, match="key_padding_mask"):
        sa.block_attention_mass(q, k, layout, lse, key_padding_mask=torch.zeros(B, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="window"):
        sa.block_attention_mass(q, k, layout, lse, window=(-2, None))
    with pytest.raises(TypeError, match="^q"):
        sa.block_attention_mass(q.long(), k, layout, lse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tensor", "block", "pattern"])
def test_the_cpu_kernel_equals_the_tensor_ops(kind, dtype):
    # The CPU kernel walks the op's lists (O(computed blocks)); the tensor ops, which GPUs
    # use, score every key: both give the same masses.
    q, k, v = qkv(q_len=90, k_len=130, seed=21, dtype=dtype)
    pad = torch.rand(B, 130, generator=torch.Generator().manual_seed(4)) < 0.25
    if kind == "tensor":
        layout = sa.TensorLayout.from_mask(torch.rand(B, HKV, 6, 9) < 0.5, BS)
    elif kind == "block":
        layout = sa.BlockLayout(torch.rand(H, 6, 9) < 0.5, BS)
    else:
        layout = sa.Longformer(24, global_tokens=[3], block_size=BS)
    for causal, window in ((False, None), (True, (40, None)), (False, (10, 20))):
        _, lse = sa.sparse_attention(q, k, v, layout, causal=causal, window=window,
                                     key_padding_mask=pad, return_lse=True)
        kernel = sa.block_attention_mass(q, k, layout, lse, causal=causal, window=window,
                                         key_padding_mask=pad)
        scale, causal_rule, rules = sa.attention.call_rules(layout, D, causal=causal, scale=None,
                                                            window=window)
        tensors = block_mass.tensor_block_mass(q, k, layout, lse, causal=causal_rule,
                                               scale=scale, key_padding_mask=pad, window=rules)
        atol = 1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(kernel, tensors, atol=atol, rtol=0)


def test_the_block_mass_op_checks_its_lse():
    q, k, v = qkv(dtype=torch.float32)
    layout = sa.BlockLayout(torch.ones(1, 7, 7, dtype=torch.bool), BS)
    lists = layout.block_lists(100, 100, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="lse: expected Float"):
        torch.ops.sparse_attention.block_mass(q, k, torch.zeros(B, H, 99), *lists[:3], None, BS,
                                              0.25, -1, -1)


def test_opcheck_block_mass():
    q, k, v = qkv(dtype=torch.float32)
    layout = sa.BlockLayout(torch.rand(1, 7, 7, generator=torch.Generator().manual_seed(2)) < 0.6, BS)
    lists = layout.block_lists(100, 100, (None, 0), torch.device("cpu"))
    _, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    torch.library.opcheck(torch.ops.sparse_attention.block_mass.default,
                          (q, k, lse, *lists[:3], None, BS, 0.25, -1, 0))
