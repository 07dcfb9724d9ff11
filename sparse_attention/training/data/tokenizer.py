"""Tokenizers behind one interface: raw UTF-8 bytes, a byte-level BPE trained on the data, and a
pretrained Hugging Face tokenizer.json; saved into and loaded back from a folder."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

KIND_FILE = "tokenizer_kind.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BPE_SEPARATOR = "<|sep|>"
# Where a Hugging Face tokenizer folder names its end-of-text token.
EOS_CONFIG_FILES = (TOKENIZER_CONFIG_FILE, "special_tokens_map.json")
SENTENCEPIECE_SPACE = "\u2581"


class Tokenizer(ABC):
    """The common interface. The separator goes between packed documents and pads batches;
    `token_bytes` counts the UTF-8 bytes each token stands for (bits per byte need it)."""

    kind: str
    vocab_size: int
    separator_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of any ids in range (invalid UTF-8 is replaced, never raised); separators
        are left out."""

    @abstractmethod
    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes per token; the separator counts 1 (like the newline
        between files), other special tokens 0."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Writes this tokenizer's own files into folder (`save_tokenizer` adds the kind)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_tensors(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text as a 1-D int64 tensor (what packing and batching consume)."""
        return [torch.tensor(ids, dtype=torch.int64) for ids in self.encode_batch(texts)]


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes, 256 the separator: nothing to train, nothing unknown."""

    kind = "bytes"
    vocab_size = 257
    separator_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensors(self, texts: Sequence[str]) -> list[torch.Tensor]:
        # One buffer copy a text instead of a Python int a byte: the default corpus is ~30 MB.
        return [torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
                if text else torch.empty(0, dtype=torch.int64) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in map(int, ids) if i != self.separator_id).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(self.vocab_size, dtype=torch.int64)

    def save(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)  # nothing else to write: it has no state


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with a separator token; the BPE and pretrained kinds share it."""

    def __init__(self, backend, separator: str, origin: str):
        self.backend = backend
        self.separator = separator
        separator_id = backend.token_to_id(separator)
        if separator_id is None:
            raise ValueError(f"data: tokenizer {origin} has no token {separator!r} for the separator")
        self.separator_id = separator_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> torch.Tensor:
        # Exact for byte-level tokenizers (a character a byte); SentencePiece-style otherwise.
        description = json.loads(self.backend.to_str())
        byte_level = _mentions_type(description.get("decoder"), "ByteLevel")
        special = {token["id"] for token in description.get("added_tokens", []) if token.get("special")}
        counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if token_id in special or token_id >= self.vocab_size:
                continue
            counts[token_id] = len(token) if byte_level else _sentencepiece_token_bytes(token)
        counts[self.separator_id] = 1
        return counts

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))


class BPETokenizer(HuggingFaceTokenizer):
    """Byte-level BPE trained on the data (GPT-2 style: every byte is a token to start with, so
    any text round-trips), with "<|sep|>" as separator."""

    kind = "bpe"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tokenizers = _tokenizers()
        pre_tokenizers = tokenizers.pre_tokenizers
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise ValueError(f"data: vocab_size must be at least {len(alphabet) + 1} for BPE (the "
                             f"{len(alphabet)} bytes and the separator), got {vocab_size}")
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_SEPARATOR],
                                      initial_alphabet=alphabet, show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls(backend, BPE_SEPARATOR, "bpe")

    @classmethod
    def load(cls, folder: Path) -> BPETokenizer:
        return cls(_load_backend(folder), BPE_SEPARATOR, str(folder))


class PretrainedTokenizer(HuggingFaceTokenizer):
    """A tokenizer.json from a downloaded model; its end-of-text token separates documents."""

    kind = "pretrained"

    @classmethod
    def load(cls, folder: Path) -> PretrainedTokenizer:
        folder = Path(folder)
        backend = _load_backend(folder)
        eos = _eos_token(folder)
        if eos is None:
            raise ValueError(f"data: tokenizer folder {folder} names no end-of-text token (eos_token in "
                             f"{' or '.join(EOS_CONFIG_FILES)}) to separate documents with")
        return cls(backend, eos, str(folder))

    def save(self, folder: Path) -> None:
        super().save(folder)
        (Path(folder) / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": self.separator}) + "\n")


TOKENIZER_KINDS = {"bytes": ByteTokenizer, "bpe": BPETokenizer, "pretrained": PretrainedTokenizer}


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    folder = Path(folder)
    tokenizer.save(folder)
    (folder / KIND_FILE).write_text(json.dumps({"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}) + "\n")


def load_tokenizer(folder: Path) -> Tokenizer:
    """A tokenizer written by `save_tokenizer`."""
    folder = Path(folder)
    kind_file = folder / KIND_FILE
    try:
        kind = json.loads(kind_file.read_text())["kind"]
    except FileNotFoundError:
        raise FileNotFoundError(f"data: tokenizer folder {folder} has no {KIND_FILE}") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"data: {kind_file} is corrupt ({error})") from None
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"data: {kind_file} names an unknown tokenizer kind {kind!r} "
                         f"(expected one of {', '.join(TOKENIZER_KINDS)})")
    cls = TOKENIZER_KINDS[kind]
    return cls() if cls is ByteTokenizer else cls.load(folder)


def build_tokenizer(spec: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """spec "bytes", "bpe" (trained on texts), or a tokenizer folder: one saved by a run, or a
    Hugging Face tokenizer.json folder."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    folder = Path(spec)
    if (folder / KIND_FILE).is_file():
        return load_tokenizer(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return PretrainedTokenizer.load(folder)
    raise ValueError(f"data: tokenizer {spec!r} is neither 'bytes', 'bpe' nor a folder with "
                     f"{TOKENIZER_FILE}")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("data: BPE and pretrained tokenizers need the `tokenizers` package: "
                          "pip install tokenizers") from None
    return tokenizers


def _load_backend(folder: Path):
    file = Path(folder) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"data: tokenizer folder {folder} has no {TOKENIZER_FILE}")
    try:
        return _tokenizers().Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises a bare Exception on a bad file
        raise ValueError(f"data: {file} is not a valid tokenizer file ({error})") from None


def _eos_token(folder: Path) -> str | None:
    for name in EOS_CONFIG_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            eos = json.loads(file.read_text()).get("eos_token")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(f"data: {file} is corrupt ({error})") from None
        if isinstance(eos, dict):  # {"content": "</s>", ...} in older files
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _mentions_type(component, type_name: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) has the given type."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == type_name:
        return True
    return any(_mentions_type(part, type_name) for key in ("decoders", "pretokenizers")
               for part in component.get(key) or [])


def _sentencepiece_token_bytes(token: str) -> int:
    """Bytes of a SentencePiece-style token: "<0x0A>" is one byte (byte fallback), "▁" a space."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1
    return len(token.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
