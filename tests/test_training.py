"""`sparse-attention train/eval/generate`: tiny runs end to end, exact resume, DDP, errors."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_attention import cli
from conftest import signal_during_step
from sparse_attention.training.checkpoint import CheckpointError
from sparse_attention.training.metrics_log import read_metrics

# A tiny model that still runs the sparse kernels (sdpa_max_len 0) on 128-token sequences.
TINY = ["--seq-len", "128", "--block-size", "32", "--d-model", "32", "--num-layers", "2",
        "--num-heads", "2", "--batch-size", "4", "--sdpa-max-len", "0", "--no-progress",
        "--no-tensorboard", "--device", "cpu", "--warmup-steps", "2", "--lr", "3e-3", "--precision", "fp32"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and quietly hum".split()


def write_corpus(folder: Path, documents: int = 12, words: int = 400) -> Path:
    """Text with structure to learn: words from a small vocabulary, sentences, files."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(words // 8)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    return folder


def train(*argv: str):
    return cli.run(["train", *TINY, *argv])


def weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def lm_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lm"
    train("--data", str(corpus), "--out", str(out), "--steps", "40", "--eval-every", "20",
          "--pattern", "fixed", "--compare", "dense")
    return out


def test_language_model_learns_and_reports(lm_run):
    for run in (lm_run, lm_run / "dense"):
        records = read_metrics(run)
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
        assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5  # from ~5.5 nats (257 tokens)
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [20, 40]
        assert evals[-1]["bits_per_byte"] < 0.75 * math.log2(257)
    report = (lm_run / "report" / "report.md").read_text()
    assert "dense" in report and "fixed" in report
    for image in ("loss_vs_step.png", "loss_vs_time.png", "throughput.png", "memory.png", "pattern.png"):
        assert (lm_run / "report" / image).stat().st_size > 1000
    saved = (lm_run / "config.yaml").read_text()
    assert "seq_len: 128" in saved and "compare: dense" in saved


def test_eval_and_generate_read_the_checkpoint(lm_run, corpus, capsys):
    own = cli.run(["eval", "--checkpoint", str(lm_run), "--device", "cpu"])
    on_file = cli.run(["eval", "--checkpoint", str(lm_run), "--data", str(corpus / "doc00.txt"),
                       "--device", "cpu"])
    final = [r for r in read_metrics(lm_run) if r["kind"] == "eval"][-1]
    assert own["bits_per_byte"] == pytest.approx(final["bits_per_byte"], rel=1e-4)
    assert 0 < on_file["bits_per_byte"] < math.log2(257) and own["step"] == 40
    text = cli.run(["generate", "--checkpoint", str(lm_run), "--prompt", "The quick",
                    "--max-new-tokens", "40", "--device", "cpu"])
    assert isinstance(text, str) and len(text) > 0
    assert "The quick" + text in capsys.readouterr().out
    again = cli.run(["generate", "--checkpoint", str(lm_run), "--prompt", "The quick",
                     "--max-new-tokens", "40", "--device", "cpu"])
    assert again == text  # seeded


def test_bpe_tokenizer_is_trained_saved_and_used_to_generate(corpus, tmp_path):
    out = tmp_path / "bpe"
    train("--data", str(corpus), "--out", str(out), "--steps", "3", "--tokenizer", "bpe",
          "--vocab-size", "300")
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    final = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    # A BPE token stands for several bytes: bits per byte are well below nats per token / ln 2.
    assert final["bits_per_byte"] < 0.6 * final["loss"] / math.log(2)
    text = cli.run(["generate", "--checkpoint", str(out), "--prompt", "The lazy", "--max-new-tokens", "5",
                    "--device", "cpu"])
    assert isinstance(text, str)


def test_classifier_learns(tmp_path):
    rng = random.Random(1)
    lines = []
    for _ in range(160):
        label = rng.choice(["ham", "spam"])
        letters = "ab" if label == "ham" else "cd"
        text = "".join(rng.choice(letters + " ") for _ in range(rng.randint(40, 200)))
        lines.append(json.dumps({"text": text, "label": label}))
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "classify"
    cli.run(["train", *TINY, "--task", "classify", "--pattern", "bigbird", "--data", str(data),
             "--out", str(out), "--steps", "30", "--eval-every", "30", "--validation-fraction", "0.2"])
    records = read_metrics(out)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert [r for r in records if r["kind"] == "eval"][-1]["accuracy"] > 0.8
    scores = cli.run(["eval", "--checkpoint", str(out), "--data", str(data), "--device", "cpu"])
    assert scores["accuracy"] > 0.8 and scores["sequences"] == 160


def test_resume_continues_bit_for_bit(corpus, tmp_path):
    """8 steps straight equal 4 steps, then a resume to 8 (with dropout, so the random
    generators must be restored too)."""
    common = ["--data", str(corpus), "--lr-decay-steps", "8", "--dropout", "0.1", "--pattern", "bigbird"]
    train(*common, "--out", str(tmp_path / "straight"), "--steps", "8")
    train(*common, "--out", str(tmp_path / "halves"), "--steps", "4")
    train("--out", str(tmp_path / "halves"), "--resume", "--steps", "8")
    assert_same_weights(tmp_path / "straight", tmp_path / "halves")
    steps = [r["step"] for r in read_metrics(tmp_path / "halves") if r["kind"] == "train"]
    assert steps == list(range(1, 9))
    log = read_metrics(tmp_path / "halves")
    train("--out", str(tmp_path / "halves"), "--resume", "--steps", "8")  # already finished
    assert read_metrics(tmp_path / "halves") == log
    assert_same_weights(tmp_path / "straight", tmp_path / "halves")


def test_ctrl_c_saves_and_resume_finishes_the_same_run(corpus, tmp_path, monkeypatch):
    common = ["--data", str(corpus), "--steps", "6", "--save-every", "100"]
    train(*common, "--out", str(tmp_path / "straight"))
    signal_during_step(monkeypatch, signal.SIGINT, 2)  # arrives during the third step
    result = train(*common, "--out", str(tmp_path / "stopped"))
    assert result.runs[0].records[-1]["step"] == 3
    assert (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip().endswith("3")
    monkeypatch.undo()
    train("--out", str(tmp_path / "stopped"), "--resume")
    assert_same_weights(tmp_path / "straight", tmp_path / "stopped")


def test_a_run_that_died_before_its_first_checkpoint_starts_afresh(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 7, "loss": 1.0}\n')
    train("--data", str(corpus), "--out", str(out), "--steps", "2")
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2]


def test_config_file_and_flags(corpus, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(f"data: {corpus}\nsteps: 3\neval_batches: 3\npattern: local\npattern_params: {{window: 64}}\n")
    out = tmp_path / "run"
    train("--config", str(config), "--out", str(out), "--steps", "2")  # the flag wins
    saved = (out / "config.yaml").read_text()
    assert "steps: 2" in saved and "eval_batches: 3" in saved and "window: 64" in saved
    as_json = tmp_path / "settings.json"
    as_json.write_text(json.dumps({"data": str(corpus), "steps": 1}))
    train("--config", str(as_json), "--out", str(tmp_path / "json"))
    assert "steps: 1" in (tmp_path / "json" / "config.yaml").read_text()


@pytest.mark.parametrize("setting, message", [
    ("stpes: 3\n", "unknown setting 'stpes' \\(did you mean 'steps'\\?\\)"),
    ("steps: -1\n", "steps: expected an int >= 1"),
    ("pattern: diagonal\n", "pattern: expected one of"),
    ("grad_clip: fast\n", "grad_clip: expected a number > 0"),
    ("- steps\n", "must hold a mapping"),
    ("steps: [3\n", "is not valid YAML"),
    ("packing: rows\n", "packing: expected one of none, documents"),
    ("packing: documents\ncontext_parallel: 2\n", "packing: 'documents' does not combine"),
])
def test_bad_settings_are_named(tmp_path, setting, message):
    config = tmp_path / "bad.yaml"
    config.write_text(setting)
    with pytest.raises(ValueError, match=message):
        train("--config", str(config), "--out", str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_bad_data_and_runs_give_clear_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="data: .*missing"):
        train("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        train("--data", str(binary), "--out", str(tmp_path / "b"))
    short = tmp_path / "short.txt"
    short.write_text("too short for a context of 128 tokens")
    with pytest.raises(ValueError, match="seq_len"):
        train("--data", str(short), "--out", str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="--resume: .* holds no run"):
        train("--out", str(tmp_path / "nothing"), "--resume")
    out = tmp_path / "run"
    train("--data", str(corpus), "--out", str(out), "--steps", "1")
    before = weights(out)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train("--data", str(corpus), "--out", str(out), "--steps", "1")
    with pytest.raises(ValueError, match="--resume: .*pattern: 'fixed' -> 'local'"):
        train("--out", str(out), "--resume", "--pattern", "local")
    after = weights(out)
    assert all(torch.equal(before[name], after[name]) for name in before)  # never overwritten
    with pytest.raises(CheckpointError, match="no checkpoint in .*nothing"):
        cli.run(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"])


def test_command_line_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_attention", "train", "--data",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "sparse-attention: error: data:" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_setting():
    from sparse_attention.training.config import FIELD_NAMES

    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in FIELD_NAMES:
        assert "--" + name.replace("_", "-") in help_text
    for flag in ("--config", "--resume"):
        assert flag in help_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_whole_batch(corpus, tmp_path, strategy):
    """torchrun with 2 gloo processes of 2 sequences each trains the weights one process
    trains on batches of 4; random layouts are checked to agree; only rank 0 writes."""
    common = [*TINY, "--data", str(corpus), "--steps", "3", "--pattern", "bigbird", "--distributed", strategy]
    common[common.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "sparse_attention", "train", *common, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = [*common, "--out", str(tmp_path / "single")]
    single[single.index("--batch-size") + 1] = "4"
    cli.run(["train", *single])
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)
    assert len(list((tmp_path / "ddp" / "checkpoints").iterdir())) == 2  # step-3 and latest
