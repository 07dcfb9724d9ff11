"""The training data pipeline: sources, tokenizers, datasets, the sampler and prepare_data."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest

from sparse_attention.training.data import Document, default_corpus_files, read_documents

UNICODE_SAMPLES = ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 😀🚀 and tabs\t\n", "ελληνικά + русский",
                   "  leading and trailing spaces  ", "mixed: naïve café — “quotes” ∑∫√"]


def random_text(rng: random.Random, words: int) -> str:
    alphabet = "abcdefghij klmnop éü日本😀\n"
    return "".join(rng.choice(alphabet) for _ in range(words))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# Sources ---------------------------------------------------------------------------------------

def test_text_file_is_one_document(tmp_path):
    file = tmp_path / "notes.md"
    file.write_text("héllo\nwörld\n", encoding="utf-8")
    assert read_documents(str(file)) == [Document("héllo\nwörld\n", source=str(file))]


def test_json_lines_records_with_labels(tmp_path):
    file = tmp_path / "data.jsonl"
    lines = [{"body": "first", "y": "spam"}, {"body": "second\u2028line", "y": 3}, None, {"body": "third", "y": 0}]
    # A blank line is skipped; a raw U+2028 inside a string does not end the record.
    file.write_text("\n".join("  " if line is None else json.dumps(line, ensure_ascii=False) for line in lines))
    docs = read_documents(str(file), text_field="body", label_field="y")
    assert [(d.text, d.label, d.source) for d in docs] == [
        ("first", "spam", f"{file}:1"), ("second\u2028line", "3", f"{file}:2"), ("third", "0", f"{file}:4")]
    assert [d.label for d in read_documents(str(file), text_field="body")] == [None] * 3


def test_folder_glob_sorted_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "two.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / ".secret.txt").write_text("hidden file")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden folder")
    (tmp_path / "c.py").write_text("three")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "four"}, {"text": "five"}])
    assert [d.text for d in read_documents(str(tmp_path))] == ["one", "two", "three", "four", "five"]
    assert [d.text for d in read_documents(str(tmp_path), glob="**/*.txt")] == ["one", "two"]
    with pytest.raises(ValueError, match=rf"data: no files in {tmp_path} match glob '\*.rst'"):
        read_documents(str(tmp_path), glob="*.rst")


def test_max_bytes_keeps_whole_documents_in_order(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("é" * 10)  # 20 bytes each
    assert [d.source for d in read_documents(str(tmp_path), max_bytes=30)] == [
        str(tmp_path / "0.txt"), str(tmp_path / "1.txt")]
    assert len(read_documents(str(tmp_path), max_bytes=40)) == 2
    with pytest.raises(ValueError, match="max_bytes"):
        read_documents(str(tmp_path), max_bytes=0)


def test_empty_documents_left_out_and_all_empty_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("text")
    assert [d.text for d in read_documents(str(tmp_path))] == ["text"]
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match=f"data: {tmp_path} holds no documents"):
        read_documents(str(tmp_path))


@pytest.mark.parametrize("content, detail", [(b"abc\x00def", "NUL"), ("café".encode("latin-1"), "byte 3")])
def test_binary_or_non_utf8_file_is_an_error(tmp_path, content, detail):
    file = tmp_path / "data.bin"
    file.write_bytes(content)
    with pytest.raises(ValueError, match=f"data: {file} is not UTF-8 text .*{detail}"):
        read_documents(str(tmp_path))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data: {tmp_path / 'nope'} does not exist"):
        read_documents(str(tmp_path / "nope"))


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"data\.jsonl:2: bad JSON"),
    ('["a list"]', r"data\.jsonl:2: expected a JSON object, got list"),
    ('{"body": "x"}', r"data\.jsonl:2: text field 'text' must be a string, it is missing \(fields: body\)"),
    ('{"text": 5}', r"data\.jsonl:2: text field 'text' must be a string, it is a int"),
])
def test_json_lines_errors_name_file_and_line(tmp_path, line, message):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match="data: .*" + message):
        read_documents(str(file))


def test_missing_or_bad_label(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: label field 'label' .* it is missing"):
        read_documents(str(file), label_field="label")
    write_jsonl(file, [{"text": "a", "label": [1]}])
    with pytest.raises(ValueError, match=r"data\.jsonl:1: label field 'label' .* it is a list"):
        read_documents(str(file), label_field="label")
    text = tmp_path / "plain.txt"
    text.write_text("no labels here")
    with pytest.raises(ValueError, match=f"data: {text} is a plain text file.*'label'"):
        read_documents(str(text), label_field="label")


def test_unreadable_file_names_the_os_error(tmp_path, monkeypatch):
    file = tmp_path / "locked.txt"
    file.write_text("secret")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(PermissionError, match=f"data: cannot read {file}: Permission denied"):
        read_documents(str(file))


def test_default_corpus_is_the_stdlib_without_installed_packages():
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = default_corpus_files()
    assert len(files) > 500 and all(f.suffix == ".py" and stdlib in f.parents for f in files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.parts)
    assert stdlib / "os.py" in files
    docs = read_documents(None, max_bytes=200_000)
    sizes = [len(d.text.encode()) for d in docs]
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])
    # The corpus order (a non-UTF-8 or empty file may be passed over).
    positions = [files.index(Path(d.source)) for d in docs]
    assert positions == sorted(set(positions)) and positions[0] <= 1


def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return folder


def test_hf_dataset_folder_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="data: .*hf is a Hugging Face dataset folder.*pip install datasets"):
        read_documents(str(hf_folder(tmp_path)))
    single = tmp_path / "single"  # a Dataset (not a DatasetDict) folder
    single.mkdir()
    (single / "state.json").write_text("{}")
    (single / "notes.txt").write_text("a state.json alone does not make a dataset")
    assert [d.text for d in read_documents(str(single), glob="*.txt")] == ["a state.json alone does not make a dataset"]
    (single / "dataset_info.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install datasets"):
        read_documents(str(single))


def test_hf_dataset_folder_reads_the_train_split(tmp_path, monkeypatch):
    class DatasetDict(dict):
        pass

    class Rows(list):
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    loaded = []
    fake = types.SimpleNamespace(DatasetDict=DatasetDict, load_from_disk=lambda path: loaded.append(path) or DatasetDict(
        train=Rows([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]), test=Rows([{"text": "t", "label": 0}])))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = hf_folder(tmp_path)
    docs = read_documents(str(folder), label_field="label")
    assert loaded == [str(folder)]
    assert [(d.text, d.label, d.source) for d in docs] == [("good", "pos", f"{folder}:row 0"),
                                                           ("bad", "neg", f"{folder}:row 1")]
    fake.load_from_disk = lambda path: DatasetDict(test=Rows())
    with pytest.raises(ValueError, match="has no 'train' split \\(splits: test\\)"):
        read_documents(str(folder))
