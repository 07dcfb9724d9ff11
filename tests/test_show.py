"""Pictures of patterns: figures and image files, text for terminals, and the show command."""

from __future__ import annotations

import sys

import pytest
import torch

import sparse_attention as sa
from sparse_attention import cli


def test_show_returns_a_figure_with_a_panel_per_distinct_head(tmp_path):
    fig = sa.show(sa.Fixed(256, num_patterns=2, block_size=32), 2048, heads=4)
    assert len(fig.axes) == 2  # heads 0..3 alternate two layouts
    assert [ax.get_title() for ax in fig.axes] == ["heads 0, 2", "heads 1, 3"]
    assert len(sa.show(sa.Strided(256, block_size=32), 2048, heads=4).axes) == 1
    out = tmp_path / "fixed.png"
    sa.show(sa.from_name("fixed", seq_len=1024), 1024, out=out, causal=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The picture is the layout: one image of [query blocks, key blocks].
    image = sa.show(sa.Local(64, block_size=32), 320).axes[0].images[0].get_array()
    assert torch.equal(torch.as_tensor(image).bool(), sa.Local(64, block_size=32).layout(320).mask[0])


def test_show_without_matplotlib_names_the_extra(monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.colors"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install sparse_attention\[plot\]"):
        sa.show(sa.Dense(), 256)


def test_show_text_shades_cells():
    text = sa.show_text(sa.Dense(block_size=16), 48, causal=True, ascii=True)
    assert text.splitlines()[1:] == ["|##    |", "|####  |", "|######|"]
    # 8 x 8 blocks drawn 4 blocks wide: each cell covers 2 x 2 blocks; a causal diagonal cell has
    # 3 of its 4 blocks set.
    text = sa.show_text(sa.Dense(block_size=16), 128, causal=True, width=8, ascii=True)
    assert text.splitlines()[1:] == ["|++      |", "|##++    |", "|####++  |", "|######++|"]
    heads = sa.show_text(sa.Strided(64, block_size=16, factorized=True), 256, heads=2)
    assert "head 0" in heads and "head 1" in heads and "█" in heads


def test_show_accepts_layouts_and_configs():
    layout = sa.BlockLayout(torch.eye(4, dtype=torch.bool), 16)
    assert sa.show_text(layout, 64, ascii=True).count("#") == 8
    assert "all heads" in sa.show_text(sa.BigBirdSparsityConfig(3, 16), 256)
    with pytest.raises(TypeError, match="^pattern"):
        sa.show_text("fixed", 256)
    with pytest.raises(ValueError, match="^layout"):
        sa.show_text(layout, 100)


def test_show_command_prints_cost_and_writes_the_picture(tmp_path, capsys):
    out = tmp_path / "fixed.png"
    cli.main(["show", "fixed", "--seq-len", "4096", "--block", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
    layout = sa.Fixed(sa.stride_for(4096, 64)).layout(4096)
    assert f"computed blocks: {layout.nnz:,} (dense: 4,096" in printed
    assert "density: 23.44%" in printed and "GFLOP" in printed and f"wrote {out}" in printed


def test_show_command_causal_counts_and_params(capsys):
    numbers = cli.run(["show", "strided", "--seq-len", "1000", "--block", "32", "--causal",
                        "--heads", "2", "--head-dim", "16", "--param", "stride=128", "--ascii"])
    printed = capsys.readouterr().out
    layout = sa.Strided(128, block_size=32).layout(1000, causal=True)
    assert numbers["computed_blocks"] == 2 * layout.nnz
    assert numbers["dense_blocks"] == 2 * 32 * 33 // 2
    assert numbers["flops"] == numbers["computed_blocks"] * 4 * 32 * 32 * 16
    assert "Strided(stride=128" in printed and "|" in printed
    cli.main(["show", "variable", "--seq-len", "512", "--heads", "2", "--param", "attention=unidirectional"])
    assert "causal" in capsys.readouterr().out  # a unidirectional config is causal by itself
    with pytest.raises(SystemExit):
        cli.main(["show", "fixed", "--param", "oops"])
