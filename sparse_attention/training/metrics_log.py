"""The metrics log of a training run: metrics.jsonl (every record), one CSV per kind of record
("train", "eval", ...) and, when the tensorboard package is installed, TensorBoard scalars.

Every write is flushed, so a killed run keeps its log up to its last record. On resume,
truncate_after(step) drops the records a killed run logged after its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import re
from pathlib import Path
from typing import IO

from sparse_attention.patterns.arguments import check_bool, check_int

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
KIND = re.compile(r"[A-Za-z0-9_-]+")


class MetricsLog:
    """Appends records of one kind and step to the run folder's metrics files.

    enabled=False (ranks other than 0) makes every method a no-op that writes nothing.
    """

    def __init__(self, folder: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.folder = Path(folder)
        self.enabled = check_bool("enabled", enabled)
        self.tensorboard = check_bool("tensorboard", tensorboard)
        self._jsonl: IO[str] | None = None
        self._csv: dict[str, tuple] = {}  # kind -> (file, csv writer, columns)
        self._writer = None  # TensorBoard SummaryWriter, made on first use
        self._purge_step: int | None = None
        self._closed = False
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._jsonl = _open_append(self.folder / METRICS_FILE)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Appends {"kind": kind, "step": step, **values} to metrics.jsonl and {kind}.csv."""
        if not isinstance(kind, str) or not KIND.fullmatch(kind):
            raise ValueError(f"kind: expected a name of letters, digits, '_' or '-', got {kind!r}")
        check_int("step", step)
        values = _plain_numbers(values)
        self._check_open()
        if not self.enabled:
            return
        handle, rows, columns = self._csv_file(kind, values)  # refuses new columns first
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        rows.writerow([step if name == "step" else values.get(name, "") for name in columns])
        handle.flush()
        writer = self._tensorboard_writer()
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(f"{kind}/{name}", float(value), step)
            writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drops every record with a step greater than `step` from all files (on resume from
        the checkpoint of that step: the steps after it will be logged again)."""
        check_int("step", step)
        self._check_open()
        if not self.enabled:
            return
        path = self.folder / METRICS_FILE
        self._jsonl.close()
        records = [(line, json.loads(line)) for line in _complete_lines(path)]
        _replace(path, "".join(line for line, record in records if record["step"] <= step))
        self._jsonl = _open_append(path)
        for kind in {record["kind"] for _, record in records} | set(self._csv):
            self._truncate_csv(kind, step)
        # TensorBoard's event files are append-only; a writer made with purge_step hides the
        # events from that step on.
        self._purge_step = step + 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for handle, _, _ in self._csv.values():
            handle.close()
        self._csv.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the metrics log of {self.folder} is closed")

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _csv_file(self, kind: str, values: dict) -> tuple:
        """The open {kind}.csv, its row writer and its columns; a new file's are this first
        row's. Raises ValueError for values with names not among the columns."""
        if kind not in self._csv:
            path = self.folder / f"{kind}.csv"
            handle = _open_append(path)
            rows = csv.writer(handle, lineterminator="\n")
            columns = _csv_header(path)
            if columns is None:
                columns = ["step", *values]
                rows.writerow(columns)
            self._csv[kind] = (handle, rows, columns)
        handle, rows, columns = self._csv[kind]
        unknown = [name for name in values if name not in columns]
        if unknown:
            raise ValueError(
                f"values: {kind!r} records have the columns {columns[1:]} (fixed by the first "
                f"record of that kind), got new ones {unknown}"
            )
        return handle, rows, columns

    def _truncate_csv(self, kind: str, step: int) -> None:
        path = self.folder / f"{kind}.csv"
        if kind in self._csv:
            self._csv.pop(kind)[0].close()
        if not path.exists():
            return
        lines = _complete_lines(path)
        rows = csv.reader(lines[1:])
        kept = lines[:1] + [line for line, row in zip(lines[1:], rows) if int(row[0]) <= step]
        _replace(path, "".join(kept))

    def _tensorboard_writer(self):
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional
                self.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.folder / TENSORBOARD_FOLDER),
                                         purge_step=self._purge_step)
        return self._writer


def read_metrics(folder: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order (a torn last line of a killed run is
    left out)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {folder}: not a training run's folder?")
    records = []
    for number, line in enumerate(_complete_lines(path), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from error
    return records


def _plain_numbers(values) -> dict[str, int | float]:
    """values with each number as a Python int or float (numpy scalars are not JSON)."""
    if not isinstance(values, dict):
        raise TypeError(f"values: expected a dict of name -> number, got {type(values).__name__}")
    for name, value in values.items():
        if not isinstance(name, str) or name in ("kind", "step"):
            raise ValueError(f"values: expected names other than 'kind' and 'step', got {name!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"values[{name!r}]: expected a number, got {type(value).__name__}")
    return {name: int(value) if isinstance(value, numbers.Integral) else float(value)
            for name, value in values.items()}


def _complete_lines(path: Path) -> list[str]:
    """The file's lines that end in a newline: a write cut off by a kill is not a record."""
    text = path.read_text(encoding="utf-8")
    return io.StringIO(text[: text.rfind("\n") + 1]).readlines()


def _open_append(path: Path) -> IO[str]:
    """Opens a log file for appending, first cutting off a torn last line (a killed run's)."""
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8", newline="")


def _csv_header(path: Path) -> list[str] | None:
    lines = _complete_lines(path)
    return next(csv.reader(lines[:1]), None)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
