"""DeepSpeed-compatible sparsity configs (sparse_attention/patterns/deepspeed.py): make_layout
equals DeepSpeed's layout for a grid of arguments (the oracle below is a line-by-line
transcription of the loops in DeepSpeed's deepspeed/ops/sparse_attention/sparsity_config.py,
for its deterministic parts), and the flaws it had are fixed."""

from __future__ import annotations

import itertools

import pytest
import torch

import sparse_attention as sa

from conftest import assert_matches_reference


# --- DeepSpeed's loops (random parts left out: they depend on Python's global random state) --

def ds_setup(num_heads, block, seq_len):
    assert seq_len % block == 0
    return torch.zeros((num_heads, seq_len // block, seq_len // block), dtype=torch.int64)


def ds_propagate(layout, different_layout_per_head):
    if not different_layout_per_head:
        layout[1:, :, :] = layout[0, :, :]
    return layout


def ds_dense(num_heads, block, seq_len):
    layout = ds_setup(num_heads, block, seq_len)
    layout[:, :, :] = 1
    return layout


def ds_fixed(num_heads, block, seq_len, different_layout_per_head=False, num_local_blocks=4,
             num_global_blocks=1, attention="bidirectional", horizontal_global_attention=False,
             num_different_global_patterns=1):
    layout = ds_setup(num_heads, block, seq_len)
    num_blocks = layout.shape[1]
    for h in range(num_heads if different_layout_per_head else 1):
        for i in range(0, num_blocks, num_local_blocks):
            end = min(i + num_local_blocks, num_blocks)
            for row in range(i, end):
                for col in range(i, (row + 1 if attention == "unidirectional" else end)):
                    layout[h, row, col] = 1
        first_global_block_idx = num_local_blocks - (1 + h % num_different_global_patterns) * num_global_blocks
        end = num_blocks - (num_blocks % num_local_blocks)
        for i in range(first_global_block_idx, end, num_local_blocks):
            first_row = 0 if attention == "bidirectional" else i
            layout[h, first_row:, i:i + num_global_blocks] = 1
            if horizontal_global_attention:
                layout[h, i:i + num_global_blocks, :] = 1
        if end < num_blocks:
            start = min(end + first_global_block_idx, num_blocks - num_global_blocks)
            end = start + num_global_blocks
            first_row = 0 if attention == "bidirectional" else start
            layout[h, first_row:, start:end] = 1
            if horizontal_global_attention:
                layout[h, start:end, :] = 1
    return ds_propagate(layout, different_layout_per_head)


def ds_global_indices(layout, h, global_block_indices, global_block_end_indices, attention,
                      horizontal, first_row_follows_attention=True):
    num_blocks = layout.shape[1]
    if global_block_end_indices is None:
        for idx in global_block_indices:
            if idx < num_blocks:
                if horizontal:
                    layout[h, idx, :] = 1
                first_row = 0 if attention == "bidirectional" or not first_row_follows_attention else idx
                layout[h, first_row:, idx] = 1
    else:
        for start_idx, end_idx in zip(global_block_indices, global_block_end_indices):
            if start_idx < num_blocks:
                end_idx = min(end_idx, num_blocks)
                if horizontal:
                    layout[h, start_idx:end_idx, :] = 1
                first_row = 0 if attention == "bidirectional" or not first_row_follows_attention else start_idx
                layout[h, first_row:, start_idx:end_idx] = 1
    return layout


def ds_variable(num_heads, block, seq_len, different_layout_per_head=False, local_window_blocks=(4,),
                global_block_indices=(0,), global_block_end_indices=None, attention="bidirectional",
                horizontal_global_attention=False):
    layout = ds_setup(num_heads, block, seq_len)
    num_blocks = layout.shape[1]
    for h in range(num_heads if different_layout_per_head else 1):
        start_block_idx = 0
        end_block_idx = 0
        for block_size in local_window_blocks:
            end_block_idx += block_size
            end_block_idx = min(end_block_idx, num_blocks)
            for row in range(start_block_idx, end_block_idx):
                for col in range(start_block_idx, (row + 1 if attention == "unidirectional" else end_block_idx)):
                    layout[h, row, col] = 1
            start_block_idx += block_size
        for i in range(start_block_idx, num_blocks, block_size):
            end_block_idx = min(i + block_size, num_blocks)
            for row in range(i, end_block_idx):
                for col in range(i, (row + 1 if attention == "unidirectional" else end_block_idx)):
                    layout[h, row, col] = 1
        ds_global_indices(layout, h, global_block_indices, global_block_end_indices, attention,
                          horizontal_global_attention)
    return ds_propagate(layout, different_layout_per_head)


def ds_sliding(layout, h, num_sliding_window_blocks, attention="bidirectional"):
    num_blocks = layout.shape[1]
    w = num_sliding_window_blocks // 2
    for row in range(0, num_blocks):
        start = max(0, row - w)
        end = min(row + w + 1, num_blocks) if attention == "bidirectional" else row + 1
        layout[h, row, start:end] = 1
    return layout


def ds_bigbird(num_heads, block, seq_len, different_layout_per_head=False, num_sliding_window_blocks=3,
               num_global_blocks=1, attention="bidirectional"):
    layout = ds_setup(num_heads, block, seq_len)
    for h in range(num_heads if different_layout_per_head else 1):
        ds_sliding(layout, h, num_sliding_window_blocks)
        layout[h, 0:num_global_blocks, :] = 1
        layout[h, :, 0:num_global_blocks] = 1
        if attention == "unidirectional":
            layout = torch.tril(layout)
    return ds_propagate(layout, different_layout_per_head)


def ds_longformer(num_heads, block, seq_len, different_layout_per_head=False, num_sliding_window_blocks=3,
                  global_block_indices=(0,), global_block_end_indices=None, attention="bidirectional"):
    layout = ds_setup(num_heads, block, seq_len)
    for h in range(num_heads if different_layout_per_head else 1):
        ds_sliding(layout, h, num_sliding_window_blocks)
        ds_global_indices(layout, h, global_block_indices, global_block_end_indices, attention,
                          True, first_row_follows_attention=False)
        if attention == "unidirectional":
            layout = torch.tril(layout)
    return ds_propagate(layout, different_layout_per_head)


def ds_local_sliding(num_heads, block, seq_len, num_sliding_window_blocks=3, attention="unidirectional"):
    layout = ds_setup(num_heads, block, seq_len)
    ds_sliding(layout, 0, num_sliding_window_blocks, attention)
    return ds_propagate(layout, False)


# --- the grid -------------------------------------------------------------------------------

SEQ_BLOCKS = [1, 3, 7, 8, 13]
BLOCK = 16


def grid(**choices):
    names = list(choices)
    for values in itertools.product(*choices.values()):
        yield dict(zip(names, values))


def fixed_arguments():
    for args in grid(num_local_blocks=[1, 2, 3, 4], num_global_blocks=[1, 2], attention=["unidirectional", "bidirectional"],
                     horizontal_global_attention=[False, True], num_different_global_patterns=[1, 2],
                     num_heads=[1, 3]):
        if args["num_local_blocks"] % args["num_global_blocks"]:
            continue
        if args["horizontal_global_attention"] and args["attention"] == "unidirectional":
            continue
        if args["num_different_global_patterns"] > args["num_local_blocks"] // args["num_global_blocks"]:
            continue
        args["different_layout_per_head"] = args["num_different_global_patterns"] > 1 or args["num_heads"] == 3
        yield args


def variable_arguments():
    for args in grid(local_window_blocks=[(4,), (1, 2, 3), (2, 5)],
                     globals_=[((0,), None), ((1, 5), None), ((0, 4), (2, 9)), ((20,), None)],
                     attention=["unidirectional", "bidirectional"], horizontal_global_attention=[False, True]):
        if args["horizontal_global_attention"] and args["attention"] == "unidirectional":
            continue
        args["global_block_indices"], args["global_block_end_indices"] = args.pop("globals_")
        yield args


def bigbird_arguments():
    yield from grid(num_sliding_window_blocks=[1, 2, 3, 5], num_global_blocks=[0, 1, 2],
                    attention=["unidirectional", "bidirectional"])


def longformer_arguments():
    for args in grid(num_sliding_window_blocks=[1, 3, 5], globals_=[((0,), None), ((2, 6), None), ((1,), (4,))],
                     attention=["unidirectional", "bidirectional"]):
        args["global_block_indices"], args["global_block_end_indices"] = args.pop("globals_")
        yield args


def local_arguments():
    yield from grid(num_sliding_window_blocks=[1, 2, 3, 5], attention=["unidirectional", "bidirectional"])


def check_against_oracle(config, oracle, seq_blocks):
    for n in seq_blocks:
        want = oracle(n * BLOCK)
        got = config.make_layout(n * BLOCK)
        assert got.dtype == torch.int64 and got.is_contiguous()
        assert torch.equal(got, want), f"{config} n={n}: {(got != want).sum()} blocks differ"


def test_dense_config():
    check_against_oracle(sa.DenseSparsityConfig(2, BLOCK), lambda s: ds_dense(2, BLOCK, s), SEQ_BLOCKS)


@pytest.mark.parametrize("args", list(fixed_arguments()), ids=str)
def test_fixed_config_equals_deepspeed(args):
    heads = args.pop("num_heads")
    config = sa.FixedSparsityConfig(heads, BLOCK, **args)
    # DeepSpeed indexes before the sequence start when it has fewer blocks than global blocks.
    lengths = [n for n in SEQ_BLOCKS if n >= args["num_global_blocks"]]
    check_against_oracle(config, lambda s: ds_fixed(heads, BLOCK, s, **args), lengths)


@pytest.mark.parametrize("args", list(variable_arguments()), ids=str)
def test_variable_config_equals_deepspeed(args):
    config = sa.VariableSparsityConfig(2, BLOCK, **args)
    check_against_oracle(config, lambda s: ds_variable(2, BLOCK, s, **args), SEQ_BLOCKS)


@pytest.mark.parametrize("args", list(bigbird_arguments()), ids=str)
def test_bigbird_config_without_random_blocks_equals_deepspeed(args):
    config = sa.BigBirdSparsityConfig(2, BLOCK, num_random_blocks=0, **args)
    lengths = [n for n in SEQ_BLOCKS if n >= max(args["num_sliding_window_blocks"], args["num_global_blocks"])]
    check_against_oracle(config, lambda s: ds_bigbird(2, BLOCK, s, **args), lengths)


@pytest.mark.parametrize("args", list(longformer_arguments()), ids=str)
def test_longformer_config_equals_deepspeed(args):
    config = sa.BSLongformerSparsityConfig(3, BLOCK, True, **args)
    lengths = [n for n in SEQ_BLOCKS if n >= args["num_sliding_window_blocks"]]
    check_against_oracle(config, lambda s: ds_longformer(3, BLOCK, s, True, **args), lengths)


@pytest.mark.parametrize("args", list(local_arguments()), ids=str)
def test_local_sliding_window_config_equals_deepspeed(args):
    config = sa.LocalSlidingWindowSparsityConfig(2, BLOCK, **args)
    lengths = [n for n in SEQ_BLOCKS if n >= args["num_sliding_window_blocks"]]
    check_against_oracle(config, lambda s: ds_local_sliding(2, BLOCK, s, **args), lengths)


# --- random blocks --------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["unidirectional", "bidirectional"])
def test_random_blocks_add_at_most_their_count_and_respect_direction(attention):
    n = 20
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    for make, without in [
        (lambda r, seed: sa.VariableSparsityConfig(4, BLOCK, True, num_random_blocks=r, attention=attention, seed=seed),
         lambda: ds_variable(4, BLOCK, n * BLOCK, True, attention=attention)),
        (lambda r, seed: sa.BigBirdSparsityConfig(4, BLOCK, True, num_random_blocks=r, attention=attention, seed=seed),
         lambda: ds_bigbird(4, BLOCK, n * BLOCK, True, attention=attention)),
    ]:
        base = without().bool()
        layout = make(3, 0).make_layout(n * BLOCK).bool()
        extra = layout & ~base
        assert (layout >= base).all()
        assert (extra.sum(-1) <= 3).all() and extra.any()
        if attention == "unidirectional":
            assert not (layout & ~lower).any()  # DeepSpeed's Variable drew future blocks here
        assert not torch.equal(layout[0], layout[1])  # different_layout_per_head: own draws
        assert torch.equal(layout, make(3, 0).make_layout(n * BLOCK).bool())
        assert not torch.equal(layout, make(3, 1).make_layout(n * BLOCK).bool())


def test_unidirectional_bigbird_first_rows_take_the_blocks_they_have():
    # DeepSpeed failed here (random.sample of 3 from the single block of row 0).
    layout = sa.BigBirdSparsityConfig(1, BLOCK, num_random_blocks=3, num_sliding_window_blocks=1,
                                      num_global_blocks=0, attention="unidirectional").make_layout(8 * BLOCK)
    counts = layout[0].sum(-1).tolist()  # 3 random blocks per row, plus the diagonal block
    assert counts[:3] == [1, 2, 3] and all(c in (3, 4) for c in counts[3:])


# --- fixes and integration ------------------------------------------------------------------

def test_sequence_lengths_need_not_be_multiples_of_the_block():
    config = sa.FixedSparsityConfig(2, BLOCK)
    assert torch.equal(config.make_layout(100), config.make_layout(112))  # both 7 blocks


def test_layouts_are_cached_per_instance():
    # DeepSpeed kept one layout per class and sequence length, shared by differing configs.
    a, b = sa.FixedSparsityConfig(2, BLOCK, num_local_blocks=2), sa.FixedSparsityConfig(2, BLOCK, num_local_blocks=4)
    assert a.layout(256, num_heads=2) is a.layout(256, num_heads=2)
    assert not torch.equal(a.layout(256, num_heads=2).mask, b.layout(256, num_heads=2).mask)


@pytest.mark.parametrize("config", [
    sa.FixedSparsityConfig(4, BLOCK, attention="unidirectional"),
    sa.FixedSparsityConfig(4, BLOCK, True, num_local_blocks=4, num_global_blocks=2, num_different_global_patterns=2),
    sa.VariableSparsityConfig(4, BLOCK, num_random_blocks=2, local_window_blocks=[2, 3]),
    sa.BigBirdSparsityConfig(4, BLOCK, True, num_random_blocks=2, attention="unidirectional"),
    sa.BSLongformerSparsityConfig(4, BLOCK, global_block_indices=[0, 5]),
    sa.LocalSlidingWindowSparsityConfig(4, BLOCK),
    sa.DenseSparsityConfig(4, BLOCK),
], ids=lambda c: type(c).__name__)
def test_config_in_sparse_attention_equals_the_reference(config):
    # seq_len 150 is not a multiple of the block; unidirectional configs are causal inside the
    # diagonal blocks without being told.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 150, 32, generator=g).requires_grad_(True) for _ in range(3))
    out = sa.sparse_attention(q, k, v, config)
    layout = sa.BlockLayout(config.make_layout(150).bool(), BLOCK)
    assert_matches_reference(out, q, k, v, layout, causal=config.causal)


def test_unidirectional_config_is_causal_inside_diagonal_blocks():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g, dtype=torch.float64) for _ in range(3))
    config = sa.LocalSlidingWindowSparsityConfig(2, BLOCK, num_sliding_window_blocks=5)
    out = sa.sparse_attention(q, k, v, config)
    i, j = torch.arange(128).unsqueeze(1), torch.arange(128).unsqueeze(0)
    allowed = (j <= i) & (i // BLOCK - j // BLOCK <= 2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, want)


class DiagonalPlusFirstColumn(sa.SparsityConfig):
    """A config written for DeepSpeed: make_layout with setup_layout and check_and_propagate_first_head_layout."""

    def make_layout(self, seq_len):
        layout = self.setup_layout(seq_len)
        layout[0] = torch.eye(layout.shape[1], dtype=torch.int64)
        layout[0, :, 0] = 1
        return self.check_and_propagate_first_head_layout(layout)


def test_a_deepspeed_style_subclass_works_as_a_pattern():
    config = DiagonalPlusFirstColumn(2, BLOCK)
    assert config.layout(100, num_heads=2).num_heads == 1
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g).requires_grad_(True) for _ in range(3))
    out = sa.sparse_attention(q, k, v, config, causal=True)
    layout = sa.BlockLayout(config.make_layout(100).bool(), BLOCK)
    assert layout.mask[:, :, 0].all() and layout.nnz == 2 * (2 * 7 - 1)
    assert_matches_reference(out, q, k, v, layout, causal=True)
    with pytest.raises(NotImplementedError, match="make_layout"):
        sa.SparsityConfig(2, BLOCK).make_layout(64)


@pytest.mark.parametrize("make,argument", [
    (lambda: sa.FixedSparsityConfig(2, BLOCK, num_local_blocks=4, num_global_blocks=3), "num_global_blocks"),
    (lambda: sa.FixedSparsityConfig(2, BLOCK, attention="sideways"), "attention"),
    (lambda: sa.FixedSparsityConfig(2, BLOCK, attention="unidirectional", horizontal_global_attention=True),
     "horizontal_global_attention"),
    (lambda: sa.FixedSparsityConfig(2, BLOCK, num_different_global_patterns=2), "num_different_global_patterns"),
    (lambda: sa.FixedSparsityConfig(2, BLOCK, True, num_local_blocks=2, num_different_global_patterns=3),
     "num_different_global_patterns"),
    (lambda: sa.VariableSparsityConfig(2, BLOCK, global_block_indices=[0, 3], global_block_end_indices=[2]),
     "global_block_end_indices"),
    (lambda: sa.VariableSparsityConfig(2, BLOCK, global_block_indices=[3], global_block_end_indices=[3]),
     "global_block_end_indices"),
    (lambda: sa.VariableSparsityConfig(2, BLOCK, local_window_blocks=[2, 0]), "local_window_blocks"),
    (lambda: sa.VariableSparsityConfig(2, BLOCK, num_random_blocks=5).make_layout(4 * BLOCK), "num_random_blocks"),
    (lambda: sa.BigBirdSparsityConfig(2, BLOCK, num_sliding_window_blocks=5).make_layout(4 * BLOCK),
     "num_sliding_window_blocks"),
    (lambda: sa.BigBirdSparsityConfig(2, BLOCK, num_global_blocks=5).make_layout(4 * BLOCK), "num_global_blocks"),
    (lambda: sa.BSLongformerSparsityConfig(2, BLOCK, attention="forward"), "attention"),
    (lambda: sa.LocalSlidingWindowSparsityConfig(2, 48), "block"),
    (lambda: sa.DenseSparsityConfig(0), "num_heads"),
    (lambda: sa.DenseSparsityConfig(2, BLOCK).make_layout(0), "seq_len"),
    (lambda: sa.DenseSparsityConfig(2, BLOCK).layout(64, num_heads=3), "num_heads"),
    (lambda: sa.DenseSparsityConfig(2, BLOCK).layout(128, 64, num_heads=2), "q_len"),
])
def test_config_errors_name_the_argument(make, argument):
    with pytest.raises((ValueError, TypeError), match=f"^{argument}"):
        make()
