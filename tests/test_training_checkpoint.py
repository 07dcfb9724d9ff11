"""Checkpoints: atomic saves, verified loads, pruning, and what a failed or killed save leaves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparse_attention.training import checkpoint
from sparse_attention.training.checkpoint import (
    CheckpointError, checkpoint_step, find_checkpoint, list_checkpoints, save_checkpoint,
)


def writer(payload: bytes, config: dict | None = None):
    """A write callback that stores a state file and a config in a sub-folder."""
    def write(folder: Path) -> None:
        (folder / "state.pt").write_bytes(payload)
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text(json.dumps(config or {"layers": 2}))
    return write


def steps(root: Path) -> list[int]:
    return [checkpoint_step(folder) for folder in list_checkpoints(root)]


def leftovers(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith(".tmp-"))


def test_save_and_find_round_trip(tmp_path):
    payload = os.urandom(10_000)
    root = tmp_path / "run" / "checkpoints"
    saved = save_checkpoint(root, 123, writer(payload, {"dim": 64}))

    assert saved == root / "step-00000123"
    assert (root / "latest").read_text().strip() == "step-00000123"
    # A run folder, its checkpoints folder and the step folder all resolve to the checkpoint.
    for path in (tmp_path / "run", root, saved):
        assert find_checkpoint(path) == saved
    assert checkpoint_step(saved) == 123
    assert (saved / "state.pt").read_bytes() == payload
    assert json.loads((saved / "model" / "config.json").read_text()) == {"dim": 64}
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["version"] == checkpoint.FORMAT_VERSION and manifest["step"] == 123
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        "state.pt": (len(payload), hashlib.sha256(payload).hexdigest()),
        "model/config.json": ((saved / "model" / "config.json").stat().st_size,
                              hashlib.sha256((saved / "model" / "config.json").read_bytes())
                              .hexdigest()),
    }
    assert leftovers(root) == []


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, writer(os.urandom(100)), keep=2)
    assert steps(tmp_path) == [40, 50]
    assert find_checkpoint(tmp_path) == tmp_path / "step-00000050"
    assert leftovers(tmp_path) == []


def test_never_prunes_the_checkpoint_just_saved(tmp_path):
    # A killed run left step 100; the run resumed from step 50 saves step 60 with keep=1.
    save_checkpoint(tmp_path, 50, writer(b"a"), keep=3)
    save_checkpoint(tmp_path, 100, writer(b"b"), keep=3)
    (tmp_path / "latest").write_text("step-00000050\n")
    saved = save_checkpoint(tmp_path, 60, writer(b"c"), keep=1)
    assert find_checkpoint(tmp_path) == saved
    assert steps(tmp_path) == [60]


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, writer(b"1"), keep=1)

    def delete_one_file_then_die(folder, ignore_errors=False):
        (Path(folder) / "state.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", delete_one_file_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, writer(b"2"), keep=1)
    monkeypatch.undo()
    assert steps(tmp_path) == [2] and find_checkpoint(tmp_path) == tmp_path / "step-00000002"
    save_checkpoint(tmp_path, 3, writer(b"3"), keep=2)
    assert steps(tmp_path) == [2, 3] and leftovers(tmp_path) == []


def test_resave_of_the_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, writer(b"old"))
    save_checkpoint(tmp_path, 7, writer(b"seven"))
    saved = save_checkpoint(tmp_path, 5, writer(b"new"))
    assert (saved / "state.pt").read_bytes() == b"new"
    assert find_checkpoint(tmp_path) == saved  # latest follows the save, even to a lower step
    save_checkpoint(tmp_path, 5, writer(b"newer"))
    assert (find_checkpoint(tmp_path) / "state.pt").read_bytes() == b"newer"
    assert steps(tmp_path) == [5, 7]
    assert leftovers(tmp_path) == []


def test_a_kill_while_a_resave_swaps_folders_leaves_latest_loadable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 5, writer(b"old"))
    real_remove = checkpoint._remove

    def remove_then_die(folder):
        real_remove(folder)
        raise KeyboardInterrupt  # stands for a kill between moving the old folder and the new

    monkeypatch.setattr(checkpoint, "_remove", remove_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, writer(b"new"))
    monkeypatch.undo()

    found = find_checkpoint(tmp_path)
    assert (found / "state.pt").read_bytes() == b"new" and checkpoint_step(found) == 5
    save_checkpoint(tmp_path, 6, writer(b"six"))
    assert find_checkpoint(tmp_path) == tmp_path / "step-00000006"
    save_checkpoint(tmp_path, 7, writer(b"seven"))
    assert leftovers(tmp_path) == []


def corrupt_missing(folder):
    (folder / "model" / "config.json").unlink()


def corrupt_truncated(folder):
    path = folder / "state.pt"
    path.write_bytes(path.read_bytes()[:400])


def corrupt_flipped(folder):
    path = folder / "state.pt"
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_manifest_gone(folder):
    (folder / "manifest.json").unlink()


def corrupt_manifest_garbled(folder):
    (folder / "manifest.json").write_text('{"format": "sparse_attention.checkpoint", "fil')


@pytest.mark.parametrize("corrupt, message, caught_without_sha", [
    (corrupt_missing, r"step-00000003 is missing model/config\.json", True),
    (corrupt_truncated, r"state\.pt is truncated or corrupted: expected 1000 bytes, found 400",
     True),
    (corrupt_flipped, r"state\.pt is corrupted: its sha256 differs", False),
    (corrupt_manifest_gone, r"step-00000003 is incomplete: it has no manifest\.json", True),
    (corrupt_manifest_garbled, r"manifest\.json is corrupted", True),
])
def test_damaged_checkpoints_are_refused(tmp_path, corrupt, message, caught_without_sha):
    saved = save_checkpoint(tmp_path / "checkpoints", 3, writer(os.urandom(1000)))
    corrupt(saved)
    for path in (tmp_path, saved):
        with pytest.raises(CheckpointError, match=message):
            find_checkpoint(path)
    if caught_without_sha:
        with pytest.raises(CheckpointError, match=message):
            find_checkpoint(tmp_path, verify=False)
    else:
        assert find_checkpoint(tmp_path, verify=False) == saved


def test_nothing_to_find(tmp_path):
    expected = f"no checkpoint in {tmp_path}: run `sparse-attention train --out {tmp_path}` first"
    with pytest.raises(CheckpointError, match="^" + expected.replace("`", ".") + "$"):
        find_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=f"--out {tmp_path}` first"):
        find_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint in .*absent"):
        find_checkpoint(tmp_path / "absent")


def test_latest_pointing_nowhere(tmp_path):
    save_checkpoint(tmp_path, 1, writer(b"x"))
    (tmp_path / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match=r"latest names step-00000009, which is not a folder"):
        find_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match=r"latest is corrupted"):
        find_checkpoint(tmp_path)


def test_without_latest_the_newest_complete_checkpoint_is_found(tmp_path):
    save_checkpoint(tmp_path, 1, writer(b"1"))
    save_checkpoint(tmp_path, 2, writer(b"2"))
    (tmp_path / "step-00000003").mkdir()  # no manifest: incomplete, not listed
    (tmp_path / "latest").unlink()
    assert steps(tmp_path) == [1, 2]
    assert find_checkpoint(tmp_path) == tmp_path / "step-00000002"


def test_a_write_that_raises_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, writer(b"good"))

    def failing(folder):
        (folder / "state.pt").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, failing)
    assert find_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert leftovers(tmp_path) == [] and steps(tmp_path) == [1]


KILLED_SAVE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from sparse_attention.training.checkpoint import save_checkpoint

    def write(folder):
        with open(folder / "state.pt", "wb") as f:
            f.write(os.urandom(4096))
            f.flush()
        os._exit(9)  # killed half-way through its files

    save_checkpoint(Path(sys.argv[1]), 2, write)
""")


def test_a_killed_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    save_checkpoint(tmp_path, 1, writer(b"good"))
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    (stale,) = leftovers(tmp_path)
    assert stale.startswith(".tmp-step-00000002-") and (tmp_path / stale / "state.pt").exists()

    found = find_checkpoint(tmp_path)
    assert found == tmp_path / "step-00000001" and (found / "state.pt").read_bytes() == b"good"
    save_checkpoint(tmp_path, 2, writer(b"again"))
    assert leftovers(tmp_path) == [] and steps(tmp_path) == [1, 2]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step: expected an int >= 0"):
        save_checkpoint(tmp_path, -1, writer(b""))
    with pytest.raises(TypeError, match="step: expected an int"):
        save_checkpoint(tmp_path, 1.0, writer(b""))
    with pytest.raises(ValueError, match="keep: expected an int >= 1"):
        save_checkpoint(tmp_path, 1, writer(b""), keep=0)
    with pytest.raises(TypeError, match="write: expected a callable"):
        save_checkpoint(tmp_path, 1, None)
    with pytest.raises(CheckpointError, match="wrote no files"):
        save_checkpoint(tmp_path, 1, lambda folder: None)
    with pytest.raises(CheckpointError, match="that name is the checkpoint's own"):
        save_checkpoint(tmp_path, 1, lambda folder: (folder / "manifest.json").write_text("{}"))
    assert leftovers(tmp_path) == [] and list_checkpoints(tmp_path) == []
