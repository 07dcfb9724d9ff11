"""Split-KV decoding (sparse_attention.split_rows): on CUDA, calls of at most 64 queries cut
each row's key blocks into pieces that run as query heads of their own, merged by their lse.

The split wraps the kernels' forward wherever attention._splits_rows says so (CUDA); here the
CPU kernels are made to run it the same way, so the lists, the merge, the backward on the
unsplit lists and every path into them (GQA, per-head and per-kv-head layouts, TensorLayouts
with empty rows, key padding, packed documents, zero-padded head dims, compiled graphs) are
checked against the fp64 reference and the unsplit call without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import attention, ops, split_rows
from sparse_attention.layout import BlockLists
from sparse_attention.window import Window
from conftest import check_against_reference, check_rows_without_keys


@pytest.fixture
def split_cpu(monkeypatch):
    """The CPU splits rows as CUDA does; returns the slots of every split call."""
    slots = []
    split = split_rows.split_row_lists

    def spy(lists, heads, count, block_size):
        slots.append(count)
        return split(lists, heads, count, block_size)

    monkeypatch.setattr(split_rows, "split_row_lists", spy)
    monkeypatch.setattr(attention, "_splits_rows",
                        lambda q, terms: q.shape[2] <= split_rows.SPLIT_QUERIES and not terms)
    return slots


def rand(g, *shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


def row_entries(lists, row):
    return lists.row_indices[lists.row_offsets[row]:lists.row_offsets[row + 1]].tolist()


@pytest.mark.parametrize("layout_heads", [1, 2, 4])
@pytest.mark.parametrize("block_size", [16, 64])
def test_pieces_are_the_rows_cut_as_the_cpu_kernels_cut_them(layout_heads, block_size):
    """Query head h's pieces, in order, are its layout head's row; a row of L blocks has
    clamp(ceil(L / blocks of 1024 keys), 1, slots) pieces of L * r // count boundaries; the
    full blocks stay first in every piece."""
    g = torch.Generator().manual_seed(layout_heads)
    heads, q_len, k_len = 4, 100, 5000
    mask = torch.rand(layout_heads, -(-q_len // block_size), -(-k_len // block_size), generator=g) < 0.7
    mask[0, 1] = False  # an empty row
    lists = BlockLists(*sa.BlockLayout(mask, block_size).block_lists(q_len, k_len, Window(300, 0),
                                                                     torch.device("cpu")))
    slots = 5
    pieces = split_rows.split_row_lists(lists, heads, slots, block_size)
    q_blocks = mask.shape[1]
    per_piece = max(1, split_rows.SPLIT_KEYS // block_size)
    assert pieces.row_num_full.shape == (1, heads * slots, q_blocks)
    assert pieces.col_num_full.shape == (1, heads * slots, mask.shape[2])
    for h in range(heads):
        for qb in range(q_blocks):
            row = (h * layout_heads // heads) * q_blocks + qb
            whole, full = row_entries(lists, row), int(lists.row_num_full.flatten()[row])
            count = min(max(-(-len(whole) // per_piece), 1), slots)
            got = []
            for s in range(slots):
                piece = (h * slots + s) * q_blocks + qb
                entries = row_entries(pieces, piece)
                first, last = s * len(whole) // count, (s + 1) * len(whole) // count
                assert entries == (whole[first:last] if s < count else [])
                assert int(pieces.row_num_full.flatten()[piece]) == max(0, min(full - first, len(entries)))
                got += entries
            assert got == whole


@pytest.mark.parametrize("q_len", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_split_calls_match_the_reference(split_cpu, q_len, dtype):
    """Out, lse, dq, dk, dv: GQA, a tail block, key padding that empties whole pieces."""
    g = torch.Generator().manual_seed(q_len)
    q = rand(g, 2, 4, q_len, 32, dtype=dtype)
    k, v = rand(g, 2, 2, 3000, 32, dtype=dtype), rand(g, 2, 2, 3000, 32, dtype=dtype)
    pad = torch.zeros(2, 3000, dtype=torch.bool)
    pad[1, 1000:2500] = True
    for causal in (False, True):
        layout = sa.Longformer(512, block_size=64).layout(q_len, 3000, num_heads=4, causal=causal)
        check_against_reference(q, k, v, layout, dict(causal=causal, key_padding_mask=pad))
    assert split_cpu and max(split_cpu) == 3


def test_per_head_and_per_kv_head_layouts_and_empty_rows(split_cpu):
    g = torch.Generator().manual_seed(5)
    q, k, v = rand(g, 2, 4, 40, 16), rand(g, 2, 2, 2000, 16), rand(g, 2, 2, 2000, 16)
    for layout_heads in (4, 2):
        mask = torch.rand(2, layout_heads, 3, 125, generator=g) < 0.5
        mask[0, 0, 1] = False  # a query block without keys
        mask[1, :, 2] = False
        layout = sa.TensorLayout.from_mask(mask, 16)
        check_against_reference(q, k, v, layout, dict(window=(700, 30)))
    pad = torch.ones(2, 2000, dtype=torch.bool)  # every key padded: every piece empty
    check_rows_without_keys(q, k, v, layout, key_padding_mask=pad)
    assert max(split_cpu) == 2  # 125 blocks of 16 keys: two pieces of 64 blocks


def test_split_equals_the_unsplit_call(split_cpu, monkeypatch):
    """fp64: the same out, lse and gradients as the kernels on the whole rows, lse's gradient
    included (the backward runs the unsplit lists)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = rand(g, 1, 8, 5, 64, dtype=torch.float64), *(rand(g, 1, 2, 9000, 64, dtype=torch.float64)
                                                          for _ in range(2))
    pattern = sa.BigBird(num_window_blocks=9, num_global_blocks=2, num_random_blocks=40,
                         per_head=True, block_size=64)
    grad_out, grad_lse = torch.randn(1, 8, 5, 64, dtype=torch.float64), torch.randn(1, 8, 5, dtype=torch.float64)

    def run():
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True)
        grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
        return out, lse, *grads

    split = run()
    assert split_cpu
    monkeypatch.setattr(attention, "_splits_rows", lambda q, terms: False)
    for a, b in zip(split, run()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_decode_steps_equal_the_full_pass(split_cpu):
    g = torch.Generator().manual_seed(7)
    q, k, v = (rand(g, 1, 4, 3000, 32, grad=False) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    pattern = sa.Longformer(1024, block_size=32)
    full, full_lse = sa.sparse_attention(q, k, v, pattern, causal=True, return_lse=True)
    assert not split_cpu  # 3000 queries: no split
    for start in (2999, 2990, 2936):  # a step, and chunks that start inside a block
        out, lse = sa.sparse_attention(q[:, :, start:], k, v, pattern, causal=True, return_lse=True)
        torch.testing.assert_close(out, full[:, :, start:], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, full_lse[:, :, start:], atol=2e-6, rtol=1e-6)
    assert len(split_cpu) >= 3


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_split_is_batch_invariant(split_cpu, kv_heads):
    g = torch.Generator().manual_seed(8)
    q, k, v = rand(g, 3, 4, 1, 64, grad=False), *(rand(g, 3, kv_heads, 5000, 64, grad=False)
                                                 for _ in range(2))
    pattern = sa.Local(4096, block_size=64)
    batched = sa.sparse_attention(q, k, v, pattern, causal=True)
    single = [sa.sparse_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern, causal=True)
              for b in range(3)]
    assert torch.equal(batched, torch.cat(single))


def test_packed_documents(split_cpu):
    """Three documents decode a step each, one of them over no keys, in one call."""
    g = torch.Generator().manual_seed(9)
    cu_q = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 2500, 2500, 4100], dtype=torch.int32)
    q, k, v = rand(g, 1, 2, 4, 32), rand(g, 1, 2, 4100, 32), rand(g, 1, 2, 4100, 32)
    check_against_reference(q, k, v, sa.Longformer(1024, block_size=64),
                            dict(causal=True, cu_seqlens=cu_q, cu_seqlens_k=cu_k))
    assert split_cpu


def test_zero_padded_head_dims_split(split_cpu, monkeypatch):
    """The padding wraps the split: the pieces run at the padded width."""
    monkeypatch.setattr(attention, "_kernel_head_dim", lambda device_type, head_dim: 64)
    g = torch.Generator().manual_seed(10)
    q, k, v = rand(g, 1, 4, 3, 40), rand(g, 1, 2, 3000, 40), rand(g, 1, 2, 3000, 24)
    layout = sa.Longformer(2048, block_size=64).layout(3, 3000, num_heads=4, causal=True)
    check_against_reference(q, k, v, layout, dict(causal=True))
    assert split_cpu


def test_long_calls_and_oversized_pieces_run_unsplit(split_cpu, monkeypatch):
    g = torch.Generator().manual_seed(11)
    q, k, v = rand(g, 1, 2, 65, 16, grad=False), *(rand(g, 1, 2, 4000, 16, grad=False) for _ in range(2))
    sa.sparse_attention(q, k, v, sa.Dense(block_size=64))
    monkeypatch.setattr(split_rows, "MAX_PARTIAL_BYTES", 1000)
    sa.sparse_attention(q[:, :, :3], k, v, sa.Dense(block_size=64))
    assert not split_cpu
    lists = sa.Dense(block_size=64).layout(3, 4000).block_lists(3, 4000, Window(), q.device)
    assert split_rows.num_slots(q[:, :, :3], v, BlockLists(*lists), 64) == 1
    monkeypatch.setattr(split_rows, "MAX_PARTIAL_BYTES", 1 << 30)
    assert split_rows.num_slots(q[:, :, :3], v, BlockLists(*lists), 64) == 4
    monkeypatch.setattr(split_rows, "MAX_HEADS", 6)  # the grid's limit: 2 heads, 3 pieces each
    assert split_rows.num_slots(q[:, :, :3], v, BlockLists(*lists), 64) == 3


def test_split_calls_compile_fullgraph(split_cpu):
    g = torch.Generator().manual_seed(12)
    q, k, v = rand(g, 1, 4, 2, 32), rand(g, 1, 2, 2500, 32), rand(g, 1, 2, 2500, 32)
    mask = torch.rand(1, 4, 1, 40, generator=g) < 0.8
    layout = sa.TensorLayout.from_mask(mask, 64)
    fn = torch.compile(lambda q, k, v, layout: sa.sparse_attention(q, k, v, layout),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, layout)
    expected = sa.sparse_attention(q, k, v, layout)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(k.grad).all()


def test_merge_of_pieces():
    """Pieces weighted by their lse; a row of empty pieces is 0 with lse = -inf."""
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 4, 1, 2)
    lse = torch.tensor([0.0, 1.0, -torch.inf, -torch.inf]).view(1, 4, 1)
    merged, merged_lse = split_rows.merge_pieces(out, lse, 2)
    w = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(merged[0, 0, 0], (w[0] * out[0, 0, 0] + w[1] * out[0, 1, 0]))
    assert merged[0, 1].eq(0).all() and torch.isneginf(merged_lse[0, 1]).all()
    torch.testing.assert_close(merged_lse[0, 0, 0], torch.logsumexp(torch.tensor([0.0, 1.0]), 0))


def test_score_terms_are_refused_here():
    q = torch.randn(1, 2, 1, 16)
    lists = sa.Dense(block_size=16).layout(1, 64).block_lists(1, 64, Window(), q.device)
    terms = sa.score_terms.resolve(q, causal=False, softcap=5.0)
    with pytest.raises(ValueError, match="softcap: split rows take no score terms"):
        split_rows.forward(q, q, q, lists, key_padding_mask=None, block_size=16, scale=1.0,
                           window=Window(), terms=terms)
    assert ops.forward is not split_rows.forward


def test_cuda_calls_split_only_when_asked(monkeypatch):
    """Opt-in until it has run on a GPU; the CPU kernels split their own rows."""
    q = torch.empty(1, 2, 1, 16, device="meta")
    monkeypatch.delenv(split_rows.CUDA_SPLIT_ENV, raising=False)
    assert not split_rows.enabled("cuda") and not attention._splits_rows(q, ())
    monkeypatch.setenv(split_rows.CUDA_SPLIT_ENV, "1")
    assert split_rows.enabled("cuda") and not split_rows.enabled("cpu")
    assert not attention._splits_rows(q, ())  # a meta tensor: no CUDA call


def test_the_cut_is_the_cpu_kernels():
    """The constants of the cut are the CPU kernels' (csrc/cpu/forward_kernel.h)."""
    import pathlib
    import re

    header = (pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cpu" / "forward_kernel.h").read_text()
    found = dict(re.findall(r"(kSplitQueries|kSplitKeys|kMaxRowPieces) = (\d+)", header))
    assert found == {"kSplitQueries": str(split_rows.SPLIT_QUERIES), "kSplitKeys": str(split_rows.SPLIT_KEYS),
                     "kMaxRowPieces": str(split_rows.MAX_PIECES)}
