"""The training data pipeline: sources, tokenizers, datasets, the sampler and prepare_data."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from sparse_attention.training.data import (BPETokenizer, ByteTokenizer, ClassificationData, Document,
                                            LanguageModelingData, PretrainedTokenizer, ResumableSampler,
                                            build_tokenizer, default_corpus_files, load_tokenizer,
                                            pack_documents, prepare_data, read_documents, save_tokenizer,
                                            split_documents)

UNICODE_SAMPLES = ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 😀🚀 and tabs\t\n", "ελληνικά + русский",
                   "  leading and trailing spaces  ", "mixed: naïve café — “quotes” ∑∫√"]


def random_text(rng: random.Random, words: int) -> str:
    alphabet = "abcdefghij klmnop éü日本😀\n"
    return "".join(rng.choice(alphabet) for _ in range(words))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    rng = random.Random(0)
    return BPETokenizer.train([random_text(rng, 2000) for _ in range(20)] + UNICODE_SAMPLES, vocab_size=400)


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


# Tokenizers ------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_token_bytes():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.separator_id, tok.kind) == (257, 256, "bytes")
    assert tok.token_bytes().tolist() == [1] * 257  # the separator counts as the newline between files
    for text in UNICODE_SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
        assert torch.equal(tok.encode_tensors([text])[0], torch.tensor(ids))
    assert tok.decode([104, 256, 105, 0xff]) == "hi\ufffd"  # separator skipped, bad UTF-8 replaced


def test_bpe_round_trip_token_bytes_and_arbitrary_ids(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert bpe.backend.id_to_token(bpe.separator_id) == "<|sep|>"
    token_bytes = bpe.token_bytes()
    assert token_bytes.shape == (400,) and token_bytes[bpe.separator_id] == 1
    rng = random.Random(1)
    for text in UNICODE_SAMPLES + [random_text(rng, 300)]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert bpe.encode_batch(UNICODE_SAMPLES) == [bpe.encode(t) for t in UNICODE_SAMPLES]
    assert len(bpe.encode("abcdefghij" * 5)) < 50  # it did learn merges
    assert isinstance(bpe.decode(list(range(bpe.vocab_size))), str)
    assert bpe.decode([bpe.separator_id]) == ""


def test_bpe_is_deterministic_and_checks_vocab_size(bpe):
    rng = random.Random(0)
    again = BPETokenizer.train([random_text(rng, 2000) for _ in range(20)] + UNICODE_SAMPLES, vocab_size=400)
    assert again.backend.to_str() == bpe.backend.to_str()
    with pytest.raises(ValueError, match="vocab_size must be at least 257 for BPE"):
        BPETokenizer.train(["x"], vocab_size=100)


@pytest.mark.parametrize("kind", ["bytes", "bpe", "pretrained"])
def test_save_and_load_every_kind(tmp_path, bpe, kind):
    if kind == "bytes":
        tok = ByteTokenizer()
    elif kind == "bpe":
        tok = bpe
    else:
        source = tmp_path / "model"
        source.mkdir()
        bpe.backend.save(str(source / "tokenizer.json"))
        (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|sep|>"}}))
        tok = build_tokenizer(str(source), [], 0)
        assert isinstance(tok, PretrainedTokenizer) and tok.separator_id == bpe.separator_id
    save_tokenizer(tok, tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.separator_id == tok.separator_id
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text
    assert type(build_tokenizer(str(tmp_path / "saved"), [], 0)) is type(tok)


def test_pretrained_without_eos_and_bad_folders(tmp_path, bpe):
    folder = tmp_path / "model"
    folder.mkdir()
    bpe.backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"data: tokenizer folder {folder} names no end-of-text token"):
        build_tokenizer(str(folder), [], 0)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=f"tokenizer {folder} has no token '</s>'"):
        build_tokenizer(str(folder), [], 0)
    with pytest.raises(ValueError, match="data: tokenizer 'gpt2' is neither 'bytes', 'bpe' nor a folder"):
        build_tokenizer("gpt2", [], 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"data: tokenizer folder {empty} has no tokenizer_kind.json"):
        load_tokenizer(empty)
    (empty / "tokenizer_kind.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_kind.json is corrupt"):
        load_tokenizer(empty)
    (empty / "tokenizer_kind.json").write_text('{"kind": "bpe"}')
    with pytest.raises(FileNotFoundError, match=f"data: tokenizer folder {empty} has no tokenizer.json"):
        load_tokenizer(empty)
    (empty / "tokenizer.json").write_text('{"garbage": 1}')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer file"):
        load_tokenizer(empty)
    (empty / "tokenizer_kind.json").write_text('{"kind": "chars"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'chars'"):
        load_tokenizer(empty)


def test_missing_tokenizers_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="data: BPE and pretrained tokenizers need .*pip install tokenizers"):
        BPETokenizer.train(["text"], 300)


def test_sentencepiece_style_token_bytes():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "</s>": 1, "<0x0A>": 2, "\u2581the": 3, "é": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "</s>"])
    backend.decoder = decoders.Metaspace()
    tok = PretrainedTokenizer(backend, "</s>", "test")
    # Special tokens stand for no text but the separator, byte fallback for one byte, "▁" a space.
    assert tok.token_bytes().tolist() == [0, 1, 1, 4, 2]


# Datasets --------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_covering():
    docs = list(range(100))
    train, validation = split_documents(docs, 0.1, seed=3)
    assert (train, validation) == split_documents(docs, 0.1, seed=3)
    assert split_documents(docs, 0.1, seed=4) != (train, validation)
    assert len(validation) == 10 and sorted(train + validation) == docs
    assert split_documents(["a", "b"], 0.01, seed=0)[1] and split_documents(["a", "b"], 0.99, seed=0)[0]
    assert split_documents(["only"], 0.5, seed=0) == (["only"], [])
    with pytest.raises(ValueError, match="validation_fraction must be between 0 and 1"):
        split_documents(docs, 1.0, seed=0)


def test_pack_documents():
    packed = pack_documents([[1, 2], torch.tensor([3]), []], separator_id=9)
    assert packed.dtype == torch.int64 and packed.tolist() == [1, 2, 9, 3, 9, 9]
    assert pack_documents([], 9).numel() == 0


def test_language_modeling_windows_are_the_stream_shifted():
    tokens = torch.randint(0, 1000, (103,), generator=torch.Generator().manual_seed(0))
    data = LanguageModelingData(tokens, seq_len=10)
    assert len(data) == 10
    for i in range(len(data)):
        inputs, targets = data[i]
        assert torch.equal(inputs, tokens[10 * i:10 * i + 10]) and torch.equal(targets, tokens[10 * i + 1:10 * i + 11])
    batch = data.collate([9, 0, 4])
    assert torch.equal(batch["input_ids"], torch.stack([data[i][0] for i in (9, 0, 4)]))
    assert torch.equal(batch["targets"], torch.stack([data[i][1] for i in (9, 0, 4)]))
    assert len(LanguageModelingData(tokens[:11], 10)) == 1
    with pytest.raises(ValueError, match=r"data: .* has 10 tokens, fewer than seq_len \+ 1 \(11\)"):
        LanguageModelingData(tokens[:10], 10)


def test_classification_padding_mask_and_truncation():
    lengths = [3, 20, 40, 1]  # exactly seq_len is not truncated
    encoded = [list(range(1, n + 1)) for n in lengths]
    data = ClassificationData(encoded, [0, 1, 2, 1], seq_len=20, block_size=8, pad_id=99)
    assert data.truncated == 1 and len(data) == 4
    batch = data.collate([0, 3])
    assert batch["input_ids"].shape == (2, 8)  # longest 3, rounded up to the block
    assert batch["input_ids"][0].tolist() == [1, 2, 3] + [99] * 5
    assert batch["key_padding_mask"].tolist()[1] == [False] + [True] * 7
    assert batch["labels"].tolist() == [0, 1]
    batch = data.collate([2, 1, 0])
    assert batch["input_ids"].shape == (3, 24)  # truncated to 20, rounded up to 24
    assert batch["input_ids"][0, :20].tolist() == list(range(1, 21))
    assert (~batch["key_padding_mask"]).sum(1).tolist() == [20, 20, 3]
    assert torch.equal(batch["input_ids"][batch["key_padding_mask"]], torch.full((72 - 43,), 99))


# Sampler ---------------------------------------------------------------------------------------

def test_sampler_resume_yields_the_same_batches():
    uninterrupted = ResumableSampler(23, 4, seed=7)
    expected = [uninterrupted.next_batch() for _ in range(20)]  # several epochs (5 batches each)
    assert uninterrupted.epoch == 3
    first = ResumableSampler(23, 4, seed=7)
    got = [first.next_batch() for _ in range(8)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ResumableSampler(23, 4, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    got += [resumed.next_batch() for _ in range(12)]
    assert got == expected
    assert expected[:5] != expected[5:10]  # a new permutation each epoch
    with pytest.raises(ValueError, match="state is for 23 sequences, the data has 24"):
        ResumableSampler(24, 4, seed=7).load_state_dict(state)


def test_sampler_ranks_cover_each_global_batch_once():
    world_size, batch_size = 3, 2
    samplers = [ResumableSampler(20, batch_size, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    single = ResumableSampler(20, batch_size * world_size, seed=1)
    seen = []
    for _ in range(3):  # one epoch: 3 global batches of 6 out of 20 items
        batches = [s.next_batch() for s in samplers]
        assert all(len(b) == batch_size for b in batches)
        assert sum(batches, []) == single.next_batch()
        seen += sum(batches, [])
    assert len(set(seen)) == 18
    assert [s.next_batch() for s in samplers][0] != seen[:2] and samplers[0].epoch == 1


def test_sampler_order_without_shuffle_and_errors():
    sampler = ResumableSampler(7, 3, seed=0, shuffle=False)
    assert [sampler.next_batch() for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    exact = ResumableSampler(6, 3, seed=0, shuffle=False)  # an exact fit uses every item
    assert [exact.next_batch() for _ in range(2)] == [[0, 1, 2], [3, 4, 5]] and exact.epoch == 0
    assert exact.next_batch() == [0, 1, 2] and exact.epoch == 1
    with pytest.raises(ValueError, match="batch-size 4 x 2 ranks needs at least 8 sequences, the data has 7"):
        ResumableSampler(7, 4, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(7, 1, seed=0, rank=2, world_size=2)


# prepare_data ----------------------------------------------------------------------------------

def test_prepare_lm_with_bytes(tmp_path):
    rng = random.Random(0)
    texts = [random_text(rng, 200 + 50 * i) for i in range(10)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i:02}.txt").write_text(text, encoding="utf-8")
    prepared = prepare_data(str(tmp_path), seq_len=32, validation_fraction=0.2, seed=1)
    assert prepared.task == "lm" and prepared.num_classes is None and isinstance(prepared.tokenizer, ByteTokenizer)
    stats = prepared.stats
    total_bytes = sum(len(t.encode()) for t in texts)
    assert (stats["documents"], stats["bytes"], stats["tokens"]) == (10, total_bytes, total_bytes + 10)
    assert stats["train_sequences"] == len(prepared.train) == (stats["train_tokens"] - 1) // 32
    train_docs, validation_docs = split_documents(texts, 0.2, seed=1)
    expected = pack_documents([list(t.encode()) for t in validation_docs], 256)
    assert torch.equal(prepared.validation.tokens, expected)
    assert prepared.tokenizer.decode(prepared.train.tokens.tolist()) == "".join(train_docs)


def test_prepare_lm_single_document_splits_its_tokens(tmp_path):
    file = tmp_path / "book.txt"
    file.write_text("a sentence of some text. " * 40)
    prepared = prepare_data(str(file), seq_len=16, validation_fraction=0.1)
    stream = torch.tensor(list(file.read_bytes()) + [256])
    assert prepared.stats["validation_tokens"] == 101 and prepared.stats["train_tokens"] == 1001 - 101
    assert torch.equal(torch.cat([prepared.train.tokens, prepared.validation.tokens]), stream)
    with pytest.raises(ValueError, match=r"single document has 1001 tokens, fewer than 2 \* \(seq_len \+ 1\)"):
        prepare_data(str(file), seq_len=600)


def test_prepare_lm_bpe_reuses_a_saved_tokenizer(tmp_path):
    rng = random.Random(2)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": random_text(rng, 500)} for _ in range(12)])
    first = prepare_data(str(data), seq_len=16, tokenizer="bpe", vocab_size=300, validation_fraction=0.25)
    save_tokenizer(first.tokenizer, tmp_path / "tok")
    again = prepare_data(str(data), seq_len=16, tokenizer="bytes", tokenizer_folder=tmp_path / "tok",
                         validation_fraction=0.25)
    assert again.tokenizer.kind == "bpe"
    assert torch.equal(again.train.tokens, first.train.tokens)
    assert torch.equal(again.validation.tokens, first.validation.tokens)


def test_prepare_classify(tmp_path):
    records = [{"text": "x" * (5 + 7 * i), "label": i % 3 * 5} for i in range(12)]  # labels 0, 5, 10
    data = write_jsonl(tmp_path / "data.jsonl", records)
    prepared = prepare_data(str(data), task="classify", seq_len=50, block_size=16, validation_fraction=0.25)
    assert prepared.label_names == ["0", "5", "10"] and prepared.num_classes == 3
    assert isinstance(prepared.train, ClassificationData) and len(prepared.validation) == 3
    assert prepared.stats["truncated"] == sum(5 + 7 * i > 50 for i in range(12))
    batch = prepared.train.collate(list(range(len(prepared.train))))
    assert batch["input_ids"].shape[1] == 64 and batch["labels"].max() <= 2
    assert ((batch["input_ids"] == 256) == batch["key_padding_mask"]).all()

    reordered = prepare_data(str(data), task="classify", seq_len=50, validation_fraction=0.25,
                             label_names=["10", "5", "0"])
    assert reordered.train.labels.tolist() == [2 - y for y in prepared.train.labels.tolist()]
    with pytest.raises(ValueError, match=r"labels \['10'\] \(field 'label'\) are not among"):
        prepare_data(str(data), task="classify", seq_len=50, label_names=["0", "5"])
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(ValueError, match="at least 2 classes, field 'label' has 1"):
        prepare_data(str(one_class), task="classify", seq_len=8)
    with pytest.raises(ValueError, match="needs a label_field"):
        prepare_data(str(data), task="classify", seq_len=8, label_field=None)
    with pytest.raises(ValueError, match="task must be one of lm, classify, got 'regress'"):
        prepare_data(str(data), task="regress", seq_len=8)
