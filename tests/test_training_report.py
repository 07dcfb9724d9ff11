"""The metrics log of a training run and the report drawn from it."""

from __future__ import annotations

import builtins
import csv
import random
import sys
import types

import pytest
import torch

import sparse_attention as sa
from sparse_attention.training.metrics_log import MetricsLog, read_metrics
from sparse_attention.training.report import RunSummary, write_report
from conftest import require_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def csv_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def log_run(log: MetricsLog, steps: range, rng: random.Random) -> list[dict]:
    """Logs train records every step and an eval record every other step; returns them."""
    records = []
    for step in steps:
        train = {"loss": rng.uniform(1, 5), "lr": rng.uniform(0, 1e-3),
                 "tokens_per_s": rng.uniform(1e3, 1e4), "memory_bytes": rng.randrange(1 << 30)}
        log.log("train", step, train)
        records.append({"kind": "train", "step": step, **train})
        if step % 2 == 0:
            evaluation = {"loss": rng.uniform(1, 5), "bits_per_byte": rng.uniform(1, 3)}
            log.log("eval", step, evaluation)
            records.append({"kind": "eval", "step": step, **evaluation})
    return records


def test_log_appends_to_jsonl_and_csv_and_resumes(tmp_path):
    rng = random.Random(0)
    with MetricsLog(tmp_path, tensorboard=False) as log:
        records = log_run(log, range(1, 4), rng)
        # Flushed as written: a run killed now keeps its log.
        assert read_metrics(tmp_path) == records
        assert len(csv_rows(tmp_path / "train.csv")) == 4
    with MetricsLog(tmp_path, tensorboard=False) as log:  # a resumed run appends
        records += log_run(log, range(4, 6), rng)

    assert read_metrics(tmp_path) == records
    train = csv_rows(tmp_path / "train.csv")
    assert train[0] == ["step", "loss", "lr", "tokens_per_s", "memory_bytes"]  # header once
    assert [row[0] for row in train[1:]] == ["1", "2", "3", "4", "5"]
    assert float(train[3][1]) == records[3]["loss"]  # the row of step 3 (after eval of step 2)
    assert csv_rows(tmp_path / "eval.csv") == [["step", "loss", "bits_per_byte"]] + [
        [str(r["step"]), repr(r["loss"]), repr(r["bits_per_byte"])]
        for r in records if r["kind"] == "eval"]
    assert not (tmp_path / "tensorboard").exists()


def test_truncate_after_drops_the_steps_to_be_redone(tmp_path):
    rng = random.Random(1)
    with MetricsLog(tmp_path, tensorboard=False) as log:
        records = log_run(log, range(1, 8), rng)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a write cut off by a kill
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.truncate_after(4)
        kept = [r for r in records if r["step"] <= 4]
        assert read_metrics(tmp_path) == kept
        assert [row[0] for row in csv_rows(tmp_path / "train.csv")] == ["step", "1", "2", "3", "4"]
        assert [row[0] for row in csv_rows(tmp_path / "eval.csv")] == ["step", "2", "4"]
        redone = log_run(log, range(5, 7), rng)
    assert read_metrics(tmp_path) == kept + redone
    assert [row[0] for row in csv_rows(tmp_path / "eval.csv")] == ["step", "2", "4", "6"]
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.truncate_after(1)  # before any eval record
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert [row[0] for row in csv_rows(tmp_path / "eval.csv")] == ["step"]


def test_a_torn_last_line_is_not_a_record(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log("train", 1, {"loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "loss": 2.0}]
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log("train", 2, {"loss": 1.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_numpy_and_torch_scalars_are_logged_as_plain_numbers(tmp_path):
    np = require_module("numpy")
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log("train", 1, {"loss": np.float32(1.5), "tokens": np.int64(3)})
        with pytest.raises(TypeError, match=r"values\['loss'\]: expected a number, got Tensor"):
            log.log("train", 2, {"loss": torch.tensor(1.0)})  # .item() it first
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "loss": 1.5, "tokens": 3}]


def test_disabled_log_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    with MetricsLog(folder, enabled=False) as log:
        log.log("train", 1, {"loss": 1.0})
        log.truncate_after(0)
    assert not folder.exists()


def test_bad_records_are_refused(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log("train", 1, {"loss": 1.0, "lr": 0.1})
        log.log("train", 2, {"loss": 1.0})  # a missing column is an empty cell
        with pytest.raises(ValueError, match=r"columns \['loss', 'lr'\].*new ones \['grad_norm'\]"):
            log.log("train", 3, {"loss": 1.0, "grad_norm": 2.0})
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # refused before writing
        with pytest.raises(ValueError, match="kind: expected a name"):
            log.log("../x", 1, {"loss": 1.0})
        with pytest.raises(ValueError, match="step: expected an int >= 0"):
            log.log("train", -1, {"loss": 1.0})
        with pytest.raises(TypeError, match=r"values\['loss'\]: expected a number, got str"):
            log.log("train", 1, {"loss": "1.0"})
        with pytest.raises(ValueError, match="names other than 'kind' and 'step'"):
            log.log("train", 1, {"step": 1})
    assert csv_rows(tmp_path / "train.csv")[2] == ["2", "1.0", ""]
    with pytest.raises(ValueError, match="is closed"):
        log.log("train", 4, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        read_metrics(tmp_path / "absent")


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    made = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step = log_dir, purge_step
            self.scalars, self.closed = [], False
            made.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    with MetricsLog(tmp_path) as log:
        log.log("train", 3, {"loss": 2.5, "memory_bytes": 7})
        log.truncate_after(2)
        log.log("eval", 3, {"accuracy": 0.5})
    first, second = made
    assert first.log_dir == str(tmp_path / "tensorboard") and first.purge_step is None
    assert first.scalars == [("train/loss", 2.5, 3), ("train/memory_bytes", 7.0, 3)]
    assert first.closed and second.closed
    assert second.purge_step == 3 and second.scalars == [("eval/accuracy", 0.5, 3)]


# -- report ------------------------------------------------------------------------------------


def fake_run(name: str, step_time: float, memory: int | None, seed: int) -> RunSummary:
    rng = random.Random(seed)
    records = []
    for step in range(1, 21):
        records.append({"kind": "train", "step": step, "loss": 5 / step + rng.random(),
                        "lr": 1e-3, "tokens_per_s": 1024 / step_time * rng.uniform(0.9, 1.1),
                        "step_time_s": step_time * rng.uniform(0.9, 1.1),
                        "elapsed_s": step * step_time, "memory_bytes": memory})
        if step % 5 == 0:
            records.append({"kind": "eval", "step": step, "elapsed_s": step * step_time,
                            "loss": 4 / step + rng.random(), "bits_per_byte": 2 / step + 1})
    pattern = sa.Strided(64, block_size=16) if name == "sparse" else sa.Dense(block_size=16)
    layout = pattern.layout(256, causal=True)
    return RunSummary.from_records(name, {"attention": name, "seq_len": 256, "steps": 20},
                                   records, density=layout.density, layout=layout)


def test_summary_from_records():
    run = fake_run("sparse", 0.1, 3 << 20, seed=2)
    train = [r for r in run.records if r["kind"] == "train"]
    middle = sorted(r["step_time_s"] for r in train)[9:11]  # 20 steps: the 10th and 11th
    assert run.step_time_s == pytest.approx(sum(middle) / 2)
    assert run.peak_memory_bytes == 3 << 20
    assert run.final == {"step": 20, "elapsed_s": 2.0, "loss": run.records[-1]["loss"],
                         "bits_per_byte": 1.1}
    with pytest.raises(ValueError, match="run 'x' has no 'train' records"):
        RunSummary.from_records("x", {}, [], density=1.0)


def test_report_of_sparse_against_dense(tmp_path):
    sparse = fake_run("sparse", 0.1, 100 << 20, seed=3)
    dense = fake_run("dense", 0.25, 300 << 20, seed=4)
    sparse.step_time_s, dense.step_time_s = 0.1, 0.25  # exact, for the ratio below
    path = write_report(tmp_path / "report", [sparse, dense], title="Strided against dense")

    assert path == tmp_path / "report" / "report.md"
    text = path.read_text()
    assert text.startswith("# Strided against dense\n")
    assert "| setting | sparse | dense |" in text and "| seq_len | 256 | 256 |" in text
    assert "| run | bits/byte | eval loss | median step time | tokens/s | peak memory |" in text
    assert f"| sparse | 1.1 | {sparse.final['loss']:.4g} | 100.0 ms |" in text
    assert "| 100.0 MiB | " + f"{sparse.density:.1%} |" in text
    assert "| median step time | 2.50x |" in text and "| peak memory | 3.00x |" in text
    names = ["loss_vs_step.png", "loss_vs_time.png", "throughput.png", "memory.png", "pattern.png"]
    for name in names:
        assert f"]({name})" in text
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG_MAGIC)


def test_report_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = fake_run("sparse", 0.1, None, seed=5)
    path = write_report(tmp_path, [run], title="One run")
    text = path.read_text()
    assert "`pip install matplotlib`" in text and ".png" not in text
    assert "| sparse | 1.1 |" in text and "| n/a |" in text and "## Ratios" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_report_refuses_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="runs: expected a non-empty list of RunSummary"):
        write_report(tmp_path, [], title="x")
    with pytest.raises(TypeError, match="title: expected a non-empty str"):
        write_report(tmp_path, [fake_run("dense", 0.1, None, seed=6)], title="")
