"""BlockLayout: validation, statistics, block lists and their cache."""

from __future__ import annotations

import threading

import pytest
import torch

import sparse_attention as sa
from sparse_attention.layout import BlockLists


def expected_kind(qb, kb, q_len, k_len, bs, left, right):
    """Brute force over elements: 0 skip, 1 full, 2 partial."""
    visible = total = 0
    for i in range(qb * bs, min(qb * bs + bs, q_len)):
        for j in range(kb * bs, min(kb * bs + bs, k_len)):
            d = j - i - (k_len - q_len)
            visible += (left is None or d >= -left) and (right is None or d <= right)
            total += 1
    if visible == 0:
        return 0
    return 1 if visible == total and total == bs * bs else 2


def listed(offsets, indices, num_full, blocks_along, to_row_col, heads=2):
    """{(head, query block, key block): 1 full / 2 partial} read back from CSR lists."""
    entries = {}
    for h in range(heads):
        for a in range(blocks_along):
            lo, hi = offsets[h * blocks_along + a].item(), offsets[h * blocks_along + a + 1].item()
            nfull = num_full.reshape(-1)[h * blocks_along + a].item()
            for pos, b in enumerate(indices[lo:hi].tolist()):
                entries[(h, *to_row_col(a, b))] = 1 if pos < nfull else 2
    return entries


@pytest.mark.parametrize(
    "q_len,k_len,window",
    [(64, 64, (None, None)), (64, 64, (None, 0)), (50, 70, (None, 0)), (70, 50, (None, 0)),
     (64, 96, (20, 3)), (33, 33, (0, None))],
)
def test_lists_match_brute_force(q_len, k_len, window):
    bs = 16
    g = torch.Generator().manual_seed(q_len * k_len)
    qb, kb = -(-q_len // bs), -(-k_len // bs)
    mask = torch.rand(2, qb, kb, generator=g) < 0.6
    layout = sa.BlockLayout(mask, bs)
    lists = layout.block_lists(q_len, k_len, window, torch.device("cpu"))
    assert all(t.dtype == torch.int32 for t in lists)
    rows = listed(lists.row_offsets, lists.row_indices, lists.row_num_full, qb, lambda a, b: (a, b))
    cols = listed(lists.col_offsets, lists.col_indices, lists.col_num_full, kb, lambda a, b: (b, a))
    want = {}
    for h in range(2):
        for r in range(qb):
            for c in range(kb):
                kind = expected_kind(r, c, q_len, k_len, bs, *window)
                if mask[h, r, c] and kind:
                    want[(h, r, c)] = kind
    assert rows == want and cols == want


def test_statistics():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, [0, 1, 2, 3], [0, 1, 2, 3]] = True
    layout = sa.BlockLayout(mask, 32)
    assert layout.nnz == 4 and layout.density == 0.25 and layout.num_heads == 1
    assert layout.flops(head_dim=64, batch_size=2, num_heads=8) == 4 * 32 * 32 * 64 * 4 * 8 * 2
    assert "density=0.250" in repr(layout)
    two_d = sa.BlockLayout(mask[0], 32)
    assert two_d.shape == (1, 4, 4)


def test_lists_are_cached_per_length_window_and_device():
    layout = sa.BlockLayout(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    cpu = torch.device("cpu")
    a = layout.block_lists(48, 48, (None, 0), cpu)
    assert layout.block_lists(48, 48, (None, 0), cpu) is a
    b = layout.block_lists(40, 48, (None, 0), cpu)  # same grid, other length: other lists
    c = layout.block_lists(48, 48, None, cpu)
    assert b is not a and c is not a
    assert a.row_num_full.sum() < c.row_num_full.sum()
    other = sa.BlockLayout(torch.ones(1, 3, 3, dtype=torch.bool), 16)
    assert other.block_lists(48, 48, (None, 0), cpu) is not a  # per instance, never per class


def test_cache_is_safe_under_threads():
    layout = sa.BlockLayout(torch.rand(4, 20, 20) < 0.5, 16)
    results = []

    def work():
        results.append(layout.block_lists(320, 320, (None, 0), torch.device("cpu")))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is results[0] for r in results)


def test_layout_does_not_alias_user_mask():
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    layout = sa.BlockLayout(mask, 16)
    mask[0, 0, 0] = False
    assert layout.nnz == 4 and layout.mask[0, 0, 0]


@pytest.mark.parametrize(
    "mask,block_size,error,match",
    [
        (torch.ones(1, 2, 2, dtype=torch.bool), 0, ValueError, "block_size"),
        (torch.ones(1, 2, 2, dtype=torch.bool), -16, ValueError, "block_size"),
        (torch.ones(1, 2, 2, dtype=torch.bool), 48, ValueError, "block_size"),
        (torch.ones(1, 2, 2, dtype=torch.bool), 512, ValueError, "block_size"),
        (torch.ones(1, 2, 2, dtype=torch.bool), 16.0, TypeError, "block_size"),
        (torch.ones(1, 2, 2, dtype=torch.bool), True, TypeError, "block_size"),
        (torch.ones(1, 2, 2), 16, TypeError, "mask: expected a bool"),
        ([[True]], 16, TypeError, "mask: expected a torch.Tensor"),
        (torch.ones(2, 2, 2, 2, dtype=torch.bool), 16, ValueError, "mask"),
        (torch.ones(1, 0, 2, dtype=torch.bool), 16, ValueError, "mask"),
    ],
)
def test_bad_layouts(mask, block_size, error, match):
    with pytest.raises(error, match=match):
        sa.BlockLayout(mask, block_size)


def test_build_block_lists_op_checks_its_grid():
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.sparse_attention.build_block_lists(torch.ones(1, 2, 2, dtype=torch.bool), 100, 32, 16, -1, -1)


def test_block_lists_type():
    lists = sa.BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16).block_lists(5, 5, None, torch.device("cpu"))
    assert isinstance(lists, BlockLists) and len(lists) == 6
