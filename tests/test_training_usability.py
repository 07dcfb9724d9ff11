"""What a new user meets: scores say how many sequences they come from, block sizes come from
the kernels' table, a failed run leaves no empty folder, the weights file has the usual
permissions, and --checkpoint pointed at a file says which folder was meant."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import sparse_attention as sa
from sparse_attention import cli, support
from sparse_attention.models import SparseTransformerConfig, SparseTransformerLM
from sparse_attention.training import TrainConfig
from sparse_attention.training import trainer as trainer_module
from sparse_attention.training.checkpoint import CheckpointError, find_checkpoint
from sparse_attention.training.config import check_supported

from test_training import TINY, train, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), documents=8, words=300)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train("--data", str(corpus), "--out", str(out), "--steps", "2", "--eval-batches", "2")
    return out


def validation_sequences(run: Path) -> int:
    return cli.run(["eval", "--checkpoint", str(run), "--device", "cpu", "--json"])["sequences"]


# -- how many sequences a score is from ---------------------------------------------------------


def test_eval_reports_the_sequences_it_scored(run, capsys):
    everything = cli.run(["eval", "--checkpoint", str(run), "--device", "cpu"])
    total = everything["sequences"]
    assert total == everything["of_sequences"] > 8
    assert f"sequences {total}" in capsys.readouterr().out
    some = cli.run(["eval", "--checkpoint", str(run), "--device", "cpu", "--max-batches", "2", "--batch-size", "4"])
    assert some["sequences"] == 8 and some["of_sequences"] == total
    assert f"sequences 8 of {total}" in capsys.readouterr().out


def test_the_run_says_its_scores_come_from_a_subset(run):
    total = validation_sequences(run)
    report = (run / "report" / "report.md").read_text()
    # --eval-batches 2 of --batch-size 4
    assert f"Final scores on 8 of {total} validation sequences." in report


def test_the_headline_says_so_too(corpus, tmp_path, capsys):
    train("--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "1", "--eval-batches", "1")
    out = capsys.readouterr().out
    assert "(on 4 of " in out and " validation sequences)" in out


# -- block sizes and what the kernels run -------------------------------------------------------


def test_help_takes_the_block_sizes_from_the_kernels_table():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    cpu, cuda = support.block_sizes("cpu"), support.block_sizes("cuda")
    assert 256 in cpu
    listed = ", ".join(map(str, cpu[:-1])) + f" or {cpu[-1]} on the CPU; "
    assert listed + ", ".join(map(str, cuda[:-1])) + f" or {cuda[-1]} on CUDA" in help_text


def test_block_size_256_trains_on_the_cpu(corpus, tmp_path):
    argv = [*TINY, "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "1", "--seq-len", "512",
            "--block-size", "256", "--batch-size", "1"]
    cli.run(["train", *argv])
    assert find_checkpoint(tmp_path / "run").name == "step-00000001"


@pytest.mark.parametrize("settings, message", [
    ({"device": "cuda", "block_size": 32}, "block_size: the kernels on CUDA take 64 or 128, got 32"),
    ({"device": "cpu", "block_size": 512}, "block_size: the kernels on the CPU take 16, 32, 64, 128 or 256"),
    ({"block_size": 48}, "block_size: the kernels take 16, 32, 64, 128 or 256, got 48 .*64 or 128 on CUDA"),
])
def test_block_sizes_no_kernel_runs_are_refused_with_the_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_block_size_32_on_cuda_is_refused_at_the_start_of_a_run(monkeypatch):
    """With --device auto the device is known only when the run starts: sa.supported() then
    names the setting (here with CUDA kernels pretended, as a GPU build would have)."""
    monkeypatch.setattr(support, "built_with_cuda", lambda: True)
    config = TrainConfig(block_size=32)
    assert sa.supported("cuda", torch.bfloat16, config.head_dim, 32) != []
    with pytest.raises(ValueError, match=r"the CUDA kernels cannot run.*block_size 32: the CUDA kernels "
                                         r"take 64, 128 and their multiples \(set by --block-size\)"):
        check_supported(config, "cuda", "bf16")
    with pytest.raises(ValueError, match=r"dtype float32.*\(set by --precision\)"):
        check_supported(TrainConfig(), "cuda", "fp32")
    check_supported(TrainConfig(), "cuda", "bf16")
    check_supported(TrainConfig(block_size=32, pattern="dense"), "cuda", "bf16")  # SDPA only


def test_a_model_the_cpu_kernels_cannot_run_fails_before_reading_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"head_dim 300: .*\(set by --d-model / --num-heads\)"):
        train("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--d-model", "600")
    assert not (tmp_path / "run").exists()


# -- a failed run leaves no empty folder --------------------------------------------------------


def test_a_failed_run_leaves_no_run_folder(corpus, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data: "):
        train("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a" / "run"))
    assert not (tmp_path / "a").exists()
    short = tmp_path / "short.txt"
    short.write_text("too short for a context of 128 tokens")
    with pytest.raises(ValueError, match="seq_len"):
        train("--data", str(short), "--out", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()

    def broken(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(trainer_module._Run, "_train_step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):  # after the folder was made
        train("--data", str(corpus), "--out", str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
    (tmp_path / "mine").mkdir()  # a folder the run did not make stays
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="out of memory"):
        train("--data", str(corpus), "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_run_that_failed_after_training_keeps_its_folder(corpus, tmp_path, monkeypatch):
    step = trainer_module._Run._train_step

    def fails_at_step_3(self):
        if self.step == 2:
            raise RuntimeError("diverged")
        return step(self)

    monkeypatch.setattr(trainer_module._Run, "_train_step", fails_at_step_3)
    with pytest.raises(RuntimeError, match="diverged"):
        train("--data", str(corpus), "--out", str(tmp_path / "run"), "--save-every", "1")
    assert find_checkpoint(tmp_path / "run").name == "step-00000002"


# -- file permissions ---------------------------------------------------------------------------


def modes(folder: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir() if path.is_file()}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_safetensors_gets_the_permissions_of_every_other_file(tmp_path, umask):
    model = SparseTransformerLM(SparseTransformerConfig(vocab_size=16, max_seq_len=64, d_model=16, num_layers=1,
                                                        num_heads=1, block_size=16, pattern="local"))
    before = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "model")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(before)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert modes(tmp_path / "model") == {"config.json": expected, "model.safetensors": expected}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_checkpoint_files_all_have_the_same_permissions(run):
    found = modes(find_checkpoint(run))
    assert "model.safetensors" in found and len(set(found.values())) == 1, found


# -- --checkpoint pointed at a file -------------------------------------------------------------


def test_checkpoint_pointed_at_a_file_names_the_folder_meant(run):
    step = find_checkpoint(run)
    cases = [(run / "config.yaml", f"did you mean the run folder {run}\\?"),
             (step / "model.safetensors", f"did you mean the checkpoint folder {step}\\?"),
             (run / "checkpoints" / "latest", f"did you mean the run folder {run}\\?")]
    for file, meant in cases:
        for command in (["eval"], ["generate", "--prompt", "x"]):
            with pytest.raises(CheckpointError, match=f"--checkpoint: {file} is a file: expected a run folder "
                                                      f".* or one checkpoint folder .*; {meant}") as error:
                cli.run([*command, "--checkpoint", str(file), "--device", "cpu"])
            assert "train --out" not in str(error.value)


def test_checkpoint_pointed_at_an_unrelated_file(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file: expected a run folder .*manifest.json\)$"):
        cli.run(["eval", "--checkpoint", str(file)])
