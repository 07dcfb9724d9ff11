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


# --- A trained model's block attention mass: `show --checkpoint RUN --text FILE` ---

TINY_RUN = ["--seq-len", "128", "--block-size", "32", "--d-model", "32", "--num-layers", "2",
            "--num-heads", "2", "--batch-size", "4", "--sdpa-max-len", "0", "--no-progress",
            "--no-tensorboard", "--device", "cpu", "--warmup-steps", "1", "--precision", "fp32",
            "--steps", "3", "--eval-every", "3", "--pattern", "fixed", "--positions", "rotary"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A language model trained for three steps (about a second) and a text for it to read."""
    root = tmp_path_factory.mktemp("show_run")
    words = "the quick brown fox jumps over a lazy dog while seven wizards hum".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(300)) + "\n"
    (root / "data").mkdir()
    for i in range(3):
        (root / "data" / f"doc{i}.txt").write_text(text[i:])
    (root / "text.txt").write_text(text)
    cli.run(["train", *TINY_RUN, "--data", str(root / "data"), "--out", str(root / "run")])
    return root / "run", root / "text.txt"


def test_show_checkpoint_draws_the_mass_and_prints_a_line_per_layer(lm_run, tmp_path, capsys):
    run, text = lm_run
    out = tmp_path / "mass.png"
    result = cli.run(["show", "--checkpoint", str(run), "--text", str(text), "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "128 tokens" in printed and "2 layers x 2 heads" in printed and f"wrote {out}" in printed
    lines = [line.strip() for line in printed.splitlines() if line.strip().startswith("layer ")]
    assert [line.split(" (")[0] for line in lines] == ["layer 0", "layer 1"]
    assert all("diagonal block" in line and "first block" in line and "entropy" in line
               for line in lines)
    assert len(result["masses"]) == 2 and result["tokens"] == 128
    # One layer, one head, a shorter sequence, on a log scale.
    cli.run(["show", "--checkpoint", str(run / "checkpoints"), "--text", str(text), "--out",
             str(out), "--layer", "1", "--head", "0", "--seq-len", "100", "--log"])
    assert "100 tokens" in capsys.readouterr().out


def test_layer_masses_are_the_layers_softmax_weights_per_block(lm_run):
    from sparse_attention.block_mass_view import attention_layers, layer_masses, row_statistics
    from sparse_attention.reference import element_mask
    from sparse_attention.training.trained_model import load_trained

    run, text = lm_run
    trained = load_trained(run, torch.device("cpu"))
    n = 100  # a tail block of 4 queries
    ids = torch.tensor(trained.tokenizer.encode(text.read_text())[:n])
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for layer in attention_layers(trained.model)]
    try:
        masses = layer_masses(trained.model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert [m.layer for m in masses] == [0, 1] and all(m.causal for m in masses)
    for mass, x, layer in zip(masses, inputs, attention_layers(trained.model)):
        assert mass.share.shape == mass.computed.shape == (2, 4, 4)
        # Every row's queries see a key: the drawn shares sum to 1 per row, 0 off the layout.
        torch.testing.assert_close(mass.share.sum(-1), torch.ones(2, 4), atol=1e-4, rtol=0)
        assert float(mass.share[~mass.computed].abs().sum()) == 0.0
        # Against dense softmax weights of the layer's q and k, recomputed from its input.
        with torch.no_grad():
            q, k, _ = layer.qkv(x).view(1, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
            q, k = layer.rotary(q), layer.rotary(k)
            layout = layer.dispatch.pattern.layout(n, num_heads=2, causal=True)
            scores = (q @ k.transpose(-1, -2) / 4.0).double()
            scores = scores.masked_fill(~element_mask(layout, n, n, causal=True), float("-inf"))
            weights = torch.nn.functional.pad(scores.softmax(-1), (0, 28, 0, 28))[0]
        expected = weights.unflatten(-1, (4, 32)).sum(-1).unflatten(-2, (4, 32)).sum(-2)
        expected = expected / torch.tensor([32.0, 32.0, 32.0, 4.0]).view(4, 1)
        torch.testing.assert_close(mass.share.double(), expected, atol=1e-5, rtol=1e-4)
        stats = row_statistics(mass)
        assert 0 < stats["diagonal"] < 1 and 0 <= stats["first"] < 1
        assert 0 < stats["entropy"] <= stats["uniform_entropy"] + 1e-6


def test_layer_masses_of_a_classifier_are_bidirectional():
    from sparse_attention.block_mass_view import layer_masses
    from sparse_attention.models import SparseClassifierConfig, SparseTransformerClassifier

    config = SparseClassifierConfig(vocab_size=20, max_seq_len=128, d_model=16, num_layers=1,
                                    num_heads=2, block_size=16, pattern="local", sdpa_max_len=0)
    masses = layer_masses(SparseTransformerClassifier(config), torch.arange(90) % 20)
    assert len(masses) == 1 and not masses[0].causal
    assert bool(masses[0].computed.triu(1).any())  # later key blocks are computed too
    torch.testing.assert_close(masses[0].share.sum(-1), torch.ones(2, 6), atol=1e-4, rtol=0)


def test_show_checkpoint_errors_name_the_flag(lm_run, tmp_path):
    run, text = lm_run
    out = str(tmp_path / "x.png")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--text", str(text), "--out", out],
         "--checkpoint: no run"),
        (["--checkpoint", str(run), "--text", str(tmp_path / "missing.txt"), "--out", out],
         "--text: no file"),
        (["--checkpoint", str(run), "--out", out], "--text: expected the text FILE"),
        (["--checkpoint", str(run), "--text", str(text)], "--out: expected the image file"),
        (["fixed", "--checkpoint", str(run), "--text", str(text), "--out", out], "NAME: not with"),
        (["--checkpoint", str(run), "--text", str(text), "--out", out, "--block", "32"],
         "--block: not with --checkpoint"),
        (["--checkpoint", str(run), "--text", str(text), "--out", out, "--layer", "2"],
         r"--layer: 2 is out of range \(the model has 2 layers\)"),
        (["--checkpoint", str(run), "--text", str(text), "--out", out, "--seq-len", "129"],
         "--seq-len: expected 1 to the model's max_seq_len 128"),
        (["fixed", "--layer", "0"], "--layer: only with --checkpoint"),
        (["fixed", "--text", str(text)], "--text: a file"),
        ([], "NAME: expected a pattern name"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli.main(["show", *argv])


def test_show_text_flag_still_comes_before_the_name(capsys):
    cli.main(["show", "--text", "local", "--seq-len", "256", "--block", "32", "--ascii"])
    assert "Local(" in capsys.readouterr().out


def test_show_checkpoint_without_matplotlib_names_the_extra(lm_run, tmp_path, monkeypatch):
    run, text = lm_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install 'sparse_attention\[plot\]'"):
        cli.main(["show", "--checkpoint", str(run), "--text", str(text), "--out",
                  str(tmp_path / "x.png")])
