"""benchmarks/bench_layouts.py (sparse_attention/benchmark/layouts.py) at tiny sizes: it makes
its tables with finite numbers, writes results.md and results.json, and says why a cell was
skipped. (Speed is shown by running the benchmark, never asserted here.)"""

import argparse
import json
import math

import pytest
import torch

from sparse_attention.benchmark import layouts, machine

TINY = ["--lists-batch", "1", "--lists-heads", "2", "--lists-seq-len", "256",
        "--seq-lens", "256", "--batch", "1", "--heads", "2", "--kv-heads", "2,1",
        "--block", "32", "--head-dim", "32", "--repeats", "1", "--warmup", "1", "--no-flex"]

SELECTION_FIELDS = layouts.SELECTION_FIELDS
NEED_SELECT = ("select_s", "select_ours_fwd_s", "select_ours_fwd_bwd_s")


def _run(argv):
    parser = argparse.ArgumentParser()
    layouts.add_arguments(parser)
    return layouts.run(parser.parse_args(argv))


def _table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells) of the first markdown table whose header starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _finite(cell: str) -> float:
    value = float(cell.rstrip("x%"))
    assert math.isfinite(value), cell
    return value


def test_tiny_run_makes_the_tables(tmp_path, capsys):
    results = _run(TINY + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert machine.one_line(results["machine"]) in out
    assert out == (tmp_path / "results.md").read_text()
    has_select = layouts._select_blocks() is not None

    (lists,) = results["lists"]
    assert lists["mask"] == ("select_blocks" if has_select else "random")
    for field in ("lists_s", "forward_s"):
        assert math.isfinite(lists[field]) and lists[field] > 0
    (row,) = _table(out, "| B | H | N | block |")
    assert row[:4] == ["1", "2", "256", "32"]
    for cell in (row[6], row[7], row[8], row[10]):  # lists ms, forward ms, share, GF/s
        _finite(cell)

    rows = results["selection"]
    assert [(r["seq_len"], r["kv_heads"]) for r in rows] == [(256, 2), (256, 1)]
    for r in rows:
        for field in SELECTION_FIELDS:
            if field in NEED_SELECT and not has_select:
                assert isinstance(r[field], layouts.Skipped)
            else:
                assert math.isfinite(r[field]) and r[field] > 0, (field, r[field])
        assert 0 < r["kept"] <= 1 and r["flops"] > 0
    forward = _table(out, "| N | Hkv | top_k |")
    backward = _table(out, "| N | Hkv | ours fwd+bwd ms |")
    assert [cells[:2] for cells in forward] == [["256", "2"], ["256", "1"]]
    assert [cells[:2] for cells in backward] == [["256", "2"], ["256", "1"]]
    for cells in forward:
        for cell in cells[4:9] if has_select else (cells[5], cells[7]):
            _finite(cell)
    for cells in backward:
        _finite(cells[2]), _finite(cells[4])
    assert "## 3." not in out  # --no-flex

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"] == results["machine"]
    assert [r["kv_heads"] for r in saved["selection"]] == [2, 1]
    assert saved["settings"]["flex"] is False


def test_slow_calls_are_skipped_with_the_reason(capsys):
    argv = TINY + ["--parts", "selection", "--seq-lens", "256,512", "--kv-heads", "2",
                   "--max-call-s", "1e-9"]
    rows = _run(argv)["selection"]
    out = capsys.readouterr().out
    assert [r["seq_len"] for r in rows] == [256, 512]
    assert math.isfinite(rows[0]["sdpa_fwd_s"])
    assert isinstance(rows[1]["sdpa_fwd_s"], layouts.Skipped)
    (_, longer) = _table(out, "| N | Hkv | top_k |")
    assert longer[7].startswith("skipped: predicted")
    assert "## 1." not in out


def test_random_mask_is_causal_with_the_first_and_diagonal_blocks():
    mask = layouts.random_causal_mask(2, 3, 9, 2, "cpu", torch.Generator().manual_seed(0))
    assert mask.shape == (2, 3, 9, 9)
    assert not torch.triu(mask, diagonal=1).any()
    assert mask[..., 0].all() and torch.diagonal(mask, dim1=-2, dim2=-1).all()
    rows = mask.sum(-1)
    assert (rows <= 4).all() and (rows[..., 3:] == 4).all()


def test_help_and_bad_arguments():
    with pytest.raises(SystemExit) as exit_:
        layouts.main(["--help"])
    assert exit_.value.code == 0
    with pytest.raises(SystemExit, match="does not divide"):
        _run(TINY + ["--kv-heads", "3"])
