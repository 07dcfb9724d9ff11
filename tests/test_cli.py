"""The command line: the speed comparison runs end to end and reports every candidate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparse_attention import cli, measure
from sparse_attention.benchmark.speed import demo_layout


def test_speed_small(capsys):
    cli.main(["speed", "--seq-len", "512", "--heads", "2", "--head-dim", "32", "--block", "32",
              "--repeats", "1"])
    out = capsys.readouterr().out
    for name in ("sparse_attention (ours)", "SDPA dense causal", "SDPA + layout mask", "speed-up"):
        assert name in out


def test_speed_layout_is_causal_and_grows_like_n_sqrt_n():
    small, large = demo_layout(4096, 64), demo_layout(4 * 4096, 64)
    assert not small.mask.triu(1).any()
    growth = large.nnz / small.nnz  # N x4: N^1.5 gives 8, N^2 gives 16, N gives 4
    assert 5 < growth < 11


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "sparse_attention", "demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--seq-len" in result.stdout


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_format_bytes():
    assert measure.format_bytes(None) == "n/a"
    assert measure.format_bytes(512) == "512 B"
    assert measure.format_bytes(3 * 2**30) == "3.0 GiB"


def test_console_script_exits_zero():
    # The installed `sparse-attention` script calls sys.exit(main()): main must return None.
    script = "import sys; from sparse_attention.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", script, "show", "local", "--seq-len", "256",
                             "--block", "32", "--text"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_op_and_models_need_torch_only(tmp_path):
    # With the extras' packages unimportable: the op, modules and models work; saving a model
    # and the training commands say which extra to install, in one line.
    import subprocess
    import sys

    script = """
import sys
for name in ("safetensors", "yaml", "tqdm", "matplotlib", "tokenizers", "transformers"):
    sys.modules[name] = None
import torch, sparse_attention as sa
from sparse_attention.models import SparseTransformerConfig, SparseTransformerLM
from sparse_attention.nn import SparseMultiheadAttention
q = torch.randn(1, 2, 100, 16)
assert sa.sparse_attention(q, q, q, sa.Local(32, block_size=16), causal=True).shape == q.shape
SparseMultiheadAttention(32, 2, pattern=sa.Local(32, block_size=16))
model = SparseTransformerLM(SparseTransformerConfig(vocab_size=10, max_seq_len=64, d_model=16,
                                                    num_layers=1, num_heads=2, block_size=16))
try:
    model.save_pretrained("model")
except ImportError as error:
    assert "sparse_attention[train]" in str(error), error
else:
    raise AssertionError("save_pretrained without safetensors")
from sparse_attention import cli
cli.run(["show", "fixed", "--seq-len", "256", "--block", "32"])
try:
    cli.main(["train", "--steps", "1"])
except SystemExit as stop:
    assert "pyyaml is needed for sparse-attention train" in str(stop), stop
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "model").exists()  # nothing written before the error
