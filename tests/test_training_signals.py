"""SIGTERM and SIGHUP stop `train` as Ctrl-C does (finish the step, save, stop), and a run
checkpoints every --save-every-minutes of wall time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparse_attention.training.checkpoint import checkpoint_step, find_checkpoint, list_checkpoints
from sparse_attention.training.metrics_log import read_metrics

from conftest import signal_during_step
from test_training import TINY, assert_same_weights, train, write_corpus

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), documents=8, words=300)


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and json.loads(line)["kind"] == "train")


def test_sigterm_stops_a_real_run_and_the_resumed_run_ends_with_the_same_weights(corpus, tmp_path):
    """A `train` process gets SIGTERM after a few steps: it saves and exits 0; resumed to a
    few steps more, it ends with the weights of an uninterrupted run (dropout on, so the
    random generators must come back too; the schedule is fixed by --lr-decay-steps)."""
    common = ["--data", str(corpus), "--lr-decay-steps", "1000", "--dropout", "0.1", "--pattern", "bigbird",
              "--eval-every", "1000", "--save-every", "1000"]
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        [sys.executable, "-m", "sparse_attention", "train", *TINY, *common, "--steps", "1000", "--out", str(stopped)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while logged_steps(stopped) < 3:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run logged no steps in 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping after this step" in err and "Continue with --resume" in err
    step = checkpoint_step(find_checkpoint(stopped))
    assert 3 <= step < 1000 and logged_steps(stopped) == step  # it finished the step it was in

    target = str(step + 3)
    train("--out", str(stopped), "--resume", "--steps", target)
    train(*common, "--steps", target, "--out", str(tmp_path / "straight"))
    assert_same_weights(tmp_path / "straight", stopped)
    assert [r["step"] for r in read_metrics(stopped) if r["kind"] == "train"] == list(range(1, step + 4))


def test_sighup_saves_and_stops_and_the_handlers_come_back(corpus, tmp_path, monkeypatch):
    def mine(number, frame):
        raise AssertionError("the run's handler should have been in place")

    previous = {number: signal.signal(number, mine) for number in (signal.SIGTERM, signal.SIGHUP)}
    signal_during_step(monkeypatch, signal.SIGHUP, 2)  # arrives during the third step
    try:
        result = train("--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "6")
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGHUP) is mine
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert result.runs[0].records[-1]["step"] == 3
    assert checkpoint_step(find_checkpoint(tmp_path / "run")) == 3


def test_a_checkpoint_every_few_minutes_of_wall_time(corpus, tmp_path):
    # A tiny interval is due after every step; 0 turns the timed saves off.
    common = ["--data", str(corpus), "--steps", "4", "--save-every", "100", "--keep-checkpoints", "10"]
    train(*common, "--save-every-minutes", "1e-9", "--out", str(tmp_path / "timed"))
    assert [checkpoint_step(c) for c in list_checkpoints(tmp_path / "timed")] == [1, 2, 3, 4]
    train(*common, "--save-every-minutes", "0", "--out", str(tmp_path / "off"))
    assert [checkpoint_step(c) for c in list_checkpoints(tmp_path / "off")] == [4]
    assert yaml.safe_load((tmp_path / "timed" / "config.yaml").read_text())["save_every_minutes"] == 1e-9
    with pytest.raises(ValueError, match="save_every_minutes: expected a number >= 0"):
        train(*common, "--save-every-minutes", "-1", "--out", str(tmp_path / "never"))
