"""benchmarks/bench_packing.py (sparse_attention/benchmark/packing.py) at tiny sizes: it makes
its table with finite numbers, SDPA on its mask and Flex on its mask_mod compute what ours
does, and it writes results.md and results.json. (Speed is shown by running the benchmark,
never asserted here.)"""

import argparse
import json
import math

import pytest
import torch

import sparse_attention as sa
from sparse_attention.benchmark import machine, packing
from conftest import require_module

TINY = ["--seq-lens", "256,512", "--doc-lens", "64,192", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "32", "--block", "32", "--chunk", "64", "--repeats", "1",
        "--dtypes", "float32", "--no-flex"]


def _run(argv):
    parser = argparse.ArgumentParser()
    packing.add_arguments(parser)
    return packing.run(parser.parse_args(argv))


def test_tiny_run_makes_the_table(tmp_path, capsys):
    results = _run(TINY + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert machine.one_line(results["machine"]) in out
    assert out == (tmp_path / "results.md").read_text()
    rows = results["ours"]
    assert [(r["seq_len"], r["pass"]) for r in rows] == [
        (256, "fwd"), (256, "fwd+bwd"), (512, "fwd"), (512, "fwd+bwd")]
    for r in rows:
        for field in packing.OURS_FIELDS:
            assert math.isfinite(r[field]) and r[field] > 0, (field, r[field])
        assert r["flops"] > 0
    for r in rows[::2]:  # SDPA's mask holds the elements ours computes
        assert r["max_error"] < 1e-4
    assert results["documents"][512] == packing.document_lengths(512, 64, 192, 0)
    assert "## 2." not in out  # --no-flex
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"] == results["machine"]
    assert [r["pass"] for r in saved["ours"]] == ["fwd", "fwd+bwd"] * 2


@pytest.mark.parametrize("total,shortest,longest", [(32768, 512, 8192), (1000, 100, 300),
                                                    (50, 64, 192), (8192, 512, 8192)])
def test_document_lengths_sum_to_the_row_within_the_bounds(total, shortest, longest):
    for seed in range(5):
        lengths = packing.document_lengths(total, shortest, longest, seed)
        assert sum(lengths) == total
        assert lengths == packing.document_lengths(total, shortest, longest, seed)
        if total >= shortest:
            assert all(shortest <= n <= longest for n in lengths), lengths


def test_flex_mask_mod_computes_what_ours_does():
    flex = require_module("torch.nn.attention.flex_attention")
    lengths, chunk, block = [100, 37, 192, 64], 64, 32
    total = sum(lengths)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, total, 16) for _ in range(3))
    expected = sa.sparse_attention(q, k, v, sa.Fixed(chunk, block_size=block), causal=True,
                                   cu_seqlens=packing.cu_seqlens(lengths))
    mask_mod = packing.flex_mask_mod(lengths, chunk, block)
    block_mask = flex.create_block_mask(mask_mod, 1, 2, total, total, device="cpu",
                                        BLOCK_SIZE=block)
    torch.testing.assert_close(flex.flex_attention(q, k, v, block_mask=block_mask), expected,
                               atol=1e-5, rtol=1e-5)
    dense = packing.element_mask(lengths, chunk, block, rows=50)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense), expected, atol=1e-5, rtol=1e-5)
    documents = packing.element_mask(lengths, None, block)
    assert documents.sum() == sum(n * (n + 1) // 2 for n in lengths)


def test_help_and_bad_arguments():
    with pytest.raises(SystemExit) as exit_:
        packing.main(["--help"])
    assert exit_.value.code == 0
    with pytest.raises(SystemExit, match="does not divide"):
        _run(TINY + ["--kv-heads", "3"])
    with pytest.raises(SystemExit, match="--doc-lens"):
        _run(TINY + ["--doc-lens", "100,50"])
