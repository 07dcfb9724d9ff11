"""Checkpoints of a training run: atomic saves, verified loads, keep-last-K pruning.

Layout of a run's checkpoints folder:

    checkpoints/
        latest                  the name of the newest complete checkpoint (one line)
        step-00000100/          one complete checkpoint
            manifest.json       format version, step, every file's path, size and sha256
            state.pt ...        whatever the trainer wrote
        .tmp-...                a save in progress, or the leftovers of one that was killed

A save writes into a `.tmp-` folder, fsyncs it, renames it into place and only then moves
`latest`, so a process killed at any moment leaves the previous checkpoint complete and named
by `latest`. The manifest is written last: a step folder without one is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from sparse_attention.patterns.arguments import check_int

FORMAT = "sparse_attention.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
CHECKPOINTS_FOLDER = "checkpoints"
STEP_FOLDER = re.compile(r"step-(\d{8,})")

_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted (the message names the path)."""


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], *, keep: int = 3) -> Path:
    """Saves one checkpoint atomically and returns its step folder.

    write(folder) writes the checkpoint's files into a fresh temporary folder inside root; a
    manifest of them is added, everything is fsynced, the folder is renamed to step-NNNNNNNN
    (replacing an earlier save of the same step) and `latest` is pointed at it. Then the oldest
    complete checkpoints beyond `keep` are removed (never the one just saved).
    """
    root = Path(root)
    check_int("step", step, minimum=0)
    check_int("keep", keep, minimum=1)
    if not callable(write):
        raise TypeError(f"write: expected a callable taking the folder, got {type(write).__name__}")
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed saves go first, so their space is free for this one.
    _remove_stale_tmp(root)

    name = step_folder_name(step)
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        _write_manifest(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    final = root / name
    if final.exists():
        if _latest_name(root) == name:
            # `latest` must name a complete checkpoint while the old one is moved aside.
            _point_latest(root, tmp.name)
        _remove(final)
    os.rename(tmp, final)
    _fsync_folder(root)
    _point_latest(root, name)
    _prune(root, keep, newest=final)
    return final


def find_checkpoint(path: Path, *, verify: bool = True) -> Path:
    """The step folder of the checkpoint at `path`: a run folder (holding checkpoints/), a
    checkpoints folder (resolved through `latest`) or one step folder.

    Checks that the manifest's files are all there with their sizes; verify=True (the default)
    also checks their sha256. Raises CheckpointError naming the path otherwise.
    """
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file: expected a run folder (holding {CHECKPOINTS_FOLDER}/) "
                              f"or one checkpoint folder (holding {MANIFEST}){_folder_meant(path)}")
    if (path / MANIFEST).exists() or STEP_FOLDER.fullmatch(path.name):
        folder = path
    else:
        folder = _resolve_latest(_checkpoints_root(path), path)
    _check_files(folder, _read_manifest(folder), verify=verify)
    return folder


def checkpoint_step(folder: Path) -> int:
    """The training step a checkpoint folder was saved at (from its manifest)."""
    return _read_manifest(Path(folder))["step"]


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints (those with a manifest) in a checkpoints or run folder, oldest
    step first."""
    root = _checkpoints_root(Path(root))
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


# -- saving ------------------------------------------------------------------------------------


def _write_manifest(folder: Path, step: int) -> None:
    if (folder / MANIFEST).exists():
        raise CheckpointError(
            f"write() wrote {folder / MANIFEST}: that name is the checkpoint's own"
        )
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"write() made {path}: expected only plain files and folders")
        if path.is_file():
            size, digest = _size_and_sha256(path, fsync=True)
            relative = path.relative_to(folder).as_posix()
            files.append({"path": relative, "size": size, "sha256": digest})
    if not files:
        raise CheckpointError(f"write() wrote no files into {folder}")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files}
    _write_synced(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    for sub in sorted({p.parent for p in folder.rglob("*")}, reverse=True):
        _fsync_folder(sub)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
    _write_synced(tmp, name + "\n")
    os.replace(tmp, root / LATEST)
    _fsync_folder(root)


def _prune(root: Path, keep: int, newest: Path) -> None:
    older = [folder for folder in list_checkpoints(root) if folder != newest]
    for folder in older[: max(0, len(older) - (keep - 1))]:
        _remove(folder)


def _remove(folder: Path) -> None:
    """Deletes a folder by first renaming it to a `.tmp-` name, so a kill in the middle leaves
    no half-deleted checkpoint that still looks complete."""
    aside = folder.with_name(f"{TMP_PREFIX}removing-{folder.name}-{os.getpid()}")
    os.rename(folder, aside)
    _fsync_folder(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    keep = _latest_name(root)  # set only if a kill came while a re-save swapped folders
    for entry in root.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.name != keep:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Makes renames and new names in `folder` durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_sha256(path: Path, *, fsync: bool = False) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


# -- finding -----------------------------------------------------------------------------------


def _checkpoints_root(path: Path) -> Path:
    """A run folder's checkpoints folder, or path itself when it is not a run folder."""
    sub = path / CHECKPOINTS_FOLDER
    return sub if sub.is_dir() else path


def _folder_meant(file: Path) -> str:
    """'; did you mean ...' naming the checkpoint or run folder a file is in, if any."""
    for folder in list(file.absolute().parents)[:3]:
        if (folder / MANIFEST).is_file():
            return f"; did you mean the checkpoint folder {_shown(folder, file)}?"
        if (folder / CHECKPOINTS_FOLDER).is_dir():
            return f"; did you mean the run folder {_shown(folder, file)}?"
        if (folder / LATEST).is_file():
            return f"; did you mean the run folder {_shown(folder.parent, file)}?"
    return ""


def _shown(folder: Path, given: Path) -> Path:
    """folder as the user would write it: relative when the given path was."""
    if given.is_absolute():
        return folder
    try:
        return folder.relative_to(Path.cwd())
    except ValueError:
        return folder


def _run_folder(root: Path) -> Path:
    return root.parent if root.name == CHECKPOINTS_FOLDER else root


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _resolve_latest(root: Path, given: Path) -> Path:
    name = _latest_name(root) if root.is_dir() else None
    if name is None:
        complete = list_checkpoints(root)
        if complete:  # a kill between the first save's rename and its `latest`
            return complete[-1]
        run = _run_folder(root)
        raise CheckpointError(
            f"no checkpoint in {given}: run `sparse-attention train --out {run}` first"
        )
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise CheckpointError(f"{root / LATEST} is corrupted: expected a folder name, got {name!r}")
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(
            f"{root / LATEST} names {name}, which is not a folder in {root} "
            "(the checkpoint was deleted or moved)"
        )
    return folder


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}: not a folder")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {folder} is incomplete: it has no {MANIFEST} (its save was interrupted)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
            raise ValueError(f"expected a {FORMAT} manifest")
        check_int("step", manifest.get("step"))
        for entry in manifest["files"]:
            if not (isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"expected a path and a sha256 for each file, got {entry!r}")
            check_int("size", entry.get("size"))
        version = manifest.get("version")
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is corrupted: {error}") from error
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}; this sparse_attention reads version "
            f"{FORMAT_VERSION} (was it written by another release?)"
        )
    return manifest


def _check_files(folder: Path, manifest: dict, *, verify: bool) -> None:
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {entry['path']}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{path} is truncated or corrupted: expected {entry['size']} bytes, found {size}"
            )
        if verify and _size_and_sha256(path)[1] != entry["sha256"]:
            raise CheckpointError(f"{path} is corrupted: its sha256 differs from the manifest's")
