"""Reading documents: the default corpus (the Python standard library's own code), text files,
JSON Lines files, folders of them, and local Hugging Face dataset folders."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

JSON_LINES_SUFFIXES = (".jsonl", ".json")
# What `datasets.save_to_disk` writes: these two for a Dataset, dataset_dict.json for a DatasetDict.
HF_DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
# Parts of the stdlib folder that are not the standard library proper: installed packages,
# caches and the build configuration.
NOT_STDLIB_PARTS = ("site-packages", "dist-packages", "__pycache__")


@dataclass(frozen=True)
class Document:
    text: str
    label: str | None = None
    source: str = ""  # "path", or "path:line" for a JSON Lines record: names it in errors


class NotUTF8Error(ValueError):
    """A file that is not UTF-8 text (the default corpus skips these; user data may not have them)."""


def default_corpus_files() -> list[Path]:
    """The standard library's own *.py files, sorted by their path inside it (the same order on
    every machine): real code, about 30 MB, present wherever Python is."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    installed = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    files = []
    for file in stdlib.rglob("*.py"):
        parts = file.relative_to(stdlib).parts
        if any(part in NOT_STDLIB_PARTS or part.startswith((".", "config-")) for part in parts):
            continue
        # The generated build configuration names this machine's paths.
        if parts[-1].startswith("_sysconfigdata") or any(p in file.parents for p in installed):
            continue
        files.append(file)
    return sorted(files, key=lambda file: file.relative_to(stdlib).as_posix())


def read_documents(path: str | None, *, glob: str = "**/*", text_field: str = "text",
                   label_field: str | None = None, max_bytes: int | None = None) -> list[Document]:
    """The documents at `path` (None: the default corpus), in a fixed order; empty documents are
    left out. `max_bytes` stops after the document that reaches that many bytes of UTF-8 text."""
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"data: max_bytes must be a positive number of bytes, got {max_bytes}")
    if path is None:
        if label_field is not None:
            raise ValueError(f"data: the default corpus has no labels (label_field {label_field!r}); "
                             "give a JSON Lines file or a dataset folder")
        documents = _default_corpus_documents()
        where = "the default corpus"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"data: {path} does not exist")
        documents = _documents_at(root, glob, text_field, label_field)
        where = str(path)
    kept = list(_first_bytes(_nonempty(documents), max_bytes))
    if not kept:
        raise ValueError(f"data: {where} holds no documents with text")
    return kept


def _default_corpus_documents() -> Iterator[Document]:
    for file in default_corpus_files():
        try:
            yield Document(_read_text(file), source=str(file))
        except NotUTF8Error:
            continue  # a few stdlib test files are latin-1 on purpose


def _documents_at(root: Path, glob: str, text_field: str, label_field: str | None) -> Iterator[Document]:
    if root.is_file():
        yield from _documents_in_file(root, text_field, label_field)
    elif any(all((root / name).is_file() for name in names) for names in HF_DATASET_MARKERS):
        yield from _hf_dataset_documents(root, text_field, label_field)
    else:
        files = sorted((file for file in root.glob(glob) if file.is_file()
                        and not any(part.startswith(".") for part in file.relative_to(root).parts)),
                       key=lambda file: file.relative_to(root).as_posix())
        if not files:
            raise ValueError(f"data: no files in {root} match glob {glob!r}")
        for file in files:
            yield from _documents_in_file(file, text_field, label_field)


def _documents_in_file(file: Path, text_field: str, label_field: str | None) -> Iterator[Document]:
    text = _read_text(file)
    if file.suffix.lower() not in JSON_LINES_SUFFIXES:
        if label_field is not None:
            raise ValueError(f"data: {file} is a plain text file, so it has no label field "
                             f"{label_field!r}: labels need JSON Lines (.jsonl) or a dataset folder")
        yield Document(text, source=str(file))
        return
    # Only "\n" ends a record: str.splitlines would also split at a raw U+2028 inside a string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"data: {source}: bad JSON ({error.msg}); expected JSON Lines, "
                             "one object per line") from None
        yield _document_from_record(record, source, text_field, label_field)


def _document_from_record(record, source: str, text_field: str, label_field: str | None,
                         label_names: list[str] | None = None) -> Document:
    """A Document from one JSON Lines object or dataset row; `label_names` maps integer labels
    to names (a dataset's ClassLabel feature)."""
    if not isinstance(record, dict):
        raise ValueError(f"data: {source}: expected a JSON object, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        found = "missing" if text_field not in record else f"a {type(text).__name__}"
        raise ValueError(f"data: {source}: text field {text_field!r} must be a string, it is {found} "
                         f"(fields: {', '.join(map(str, record)) or 'none'})")
    if label_field is None:
        return Document(text, source=source)
    label = record.get(label_field)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        found = "missing" if label_field not in record else f"a {type(label).__name__}"
        raise ValueError(f"data: {source}: label field {label_field!r} must be a string or an "
                         f"integer, it is {found}")
    if label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
        label = label_names[label]
    return Document(text, label=str(label), source=source)


def _hf_dataset_documents(folder: Path, text_field: str, label_field: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data: {folder} is a Hugging Face dataset folder; reading it needs the "
                          "`datasets` package: pip install datasets") from None
    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"data: {folder} has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    feature = getattr(dataset, "features", {}).get(label_field) if label_field else None
    label_names = getattr(feature, "names", None)  # a ClassLabel's names for its integer labels
    for row_number, row in enumerate(dataset):
        yield _document_from_record(row, f"{folder}:row {row_number}", text_field, label_field, label_names)


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except PermissionError as error:
        raise PermissionError(f"data: cannot read {file}: {error.strerror}") from error
    except OSError as error:
        raise OSError(f"data: cannot read {file}: {error.strerror or error}") from error
    if b"\x00" in raw:
        raise NotUTF8Error(f"data: {file} is not UTF-8 text (it has NUL bytes: binary data?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotUTF8Error(f"data: {file} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def _nonempty(documents: Iterable[Document]) -> Iterator[Document]:
    return (document for document in documents if document.text)


def _first_bytes(documents: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    if max_bytes is None:
        yield from documents
        return
    total = 0
    for document in documents:
        if total >= max_bytes:
            return
        total += len(document.text.encode("utf-8"))
        yield document
