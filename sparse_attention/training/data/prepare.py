"""From a data argument to ready datasets: read, split, tokenize, pack or batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparse_attention.training.data.datasets import (ClassificationData, LanguageModelingData,
                                                      pack_documents, split_documents)
from sparse_attention.training.data.sources import Document, read_documents
from sparse_attention.training.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

TASKS = ("lm", "classify")
# none: language-modelling windows attend across the documents' separators, and each
# classified document has a padded row of its own; documents: every document is attended
# alone (the op's cu_seqlens), classified documents share one row without padding.
PACKINGS = ("none", "documents")


@dataclass
class PreparedData:
    task: str  # "lm" or "classify"
    tokenizer: Tokenizer
    train: LanguageModelingData | ClassificationData
    validation: LanguageModelingData | ClassificationData
    num_classes: int | None = None
    label_names: list[str] | None = None
    stats: dict = field(default_factory=dict)


def prepare_data(data: str | None, *, task: str = "lm", seq_len: int, block_size: int = 64,
                 tokenizer: str = "bytes", vocab_size: int = 4096, validation_fraction: float = 0.05,
                 seed: int = 0, glob: str = "**/*", text_field: str = "text",
                 label_field: str | None = "label", max_bytes: int | None = None,
                 tokenizer_folder: Path | None = None, label_names: list[str] | None = None,
                 packing: str = "none") -> PreparedData:
    """The datasets for a run. The tokenizer is trained on the train split only; with
    tokenizer_folder (a run's saved tokenizer) and label_names it is reproduced exactly.
    packing: one of PACKINGS."""
    if task not in TASKS:
        raise ValueError(f"data: task must be one of {', '.join(TASKS)}, got {task!r}")
    if packing not in PACKINGS:
        raise ValueError(f"data: packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    if seq_len < 1 or block_size < 1:
        raise ValueError(f"data: seq_len and block_size must be positive, got {seq_len} and {block_size}")
    if task == "classify" and not label_field:
        raise ValueError("data: task 'classify' needs a label_field")
    documents = read_documents(data, glob=glob, text_field=text_field,
                               label_field=label_field if task == "classify" else None, max_bytes=max_bytes)
    train_docs, validation_docs = split_documents(documents, validation_fraction, seed)
    if tokenizer_folder is not None:
        chosen = load_tokenizer(tokenizer_folder)
    else:
        chosen = build_tokenizer(tokenizer, (doc.text for doc in train_docs), vocab_size)
    stats = {"documents": len(documents), "bytes": sum(len(doc.text.encode("utf-8")) for doc in documents)}
    if task == "lm":
        prepared = _language_modeling(chosen, train_docs, validation_docs, seq_len, validation_fraction,
                                      packed=packing == "documents")
    else:
        prepared = _classification(chosen, train_docs, validation_docs, seq_len, block_size, label_field,
                                   label_names, packed=packing == "documents")
    prepared.stats = {**stats, **prepared.stats, "train_sequences": len(prepared.train),
                      "validation_sequences": len(prepared.validation)}
    return prepared


def _language_modeling(tokenizer: Tokenizer, train_docs: list[Document], validation_docs: list[Document],
                       seq_len: int, validation_fraction: float, packed: bool) -> PreparedData:
    def stream(docs: list[Document]) -> torch.Tensor:
        return pack_documents(tokenizer.encode_tensors([doc.text for doc in docs]), tokenizer.separator_id)

    train_tokens = stream(train_docs)
    if validation_docs:
        validation_tokens = stream(validation_docs)
    else:  # a single document: its last tokens are the validation
        num_validation = max(seq_len + 1, math.ceil(validation_fraction * train_tokens.numel()))
        if train_tokens.numel() - num_validation < seq_len + 1:
            raise ValueError(f"data: the single document has {train_tokens.numel()} tokens, fewer than "
                             f"2 * (seq_len + 1) ({2 * (seq_len + 1)}) to split into train and validation")
        validation_tokens = train_tokens[-num_validation:]
        train_tokens = train_tokens[:-num_validation]
    separator = tokenizer.separator_id if packed else None
    return PreparedData(task="lm", tokenizer=tokenizer,
                        train=LanguageModelingData(train_tokens, seq_len, name="the train split",
                                                   separator_id=separator),
                        validation=LanguageModelingData(validation_tokens, seq_len, name="the validation split",
                                                        separator_id=separator),
                        stats={"tokens": train_tokens.numel() + validation_tokens.numel(),
                               "train_tokens": train_tokens.numel(),
                               "validation_tokens": validation_tokens.numel(), "truncated": 0})


def _classification(tokenizer: Tokenizer, train_docs: list[Document], validation_docs: list[Document],
                    seq_len: int, block_size: int, label_field: str,
                    label_names: list[str] | None, packed: bool) -> PreparedData:
    found = {doc.label for doc in train_docs + validation_docs}
    if label_names is None:
        label_names = sorted(found, key=_label_order(found))
    else:
        unknown = sorted(found - set(label_names))
        if unknown:
            raise ValueError(f"data: labels {unknown} (field {label_field!r}) are not among the run's "
                             f"label names {label_names}")
    if len(label_names) < 2:
        raise ValueError(f"data: classification needs at least 2 classes, field {label_field!r} "
                         f"has {len(label_names)}: {label_names}")
    index = {name: i for i, name in enumerate(label_names)}

    def dataset(docs: list[Document]) -> ClassificationData:
        encoded = tokenizer.encode_tensors([doc.text for doc in docs])
        return ClassificationData(encoded, [index[doc.label] for doc in docs], seq_len, block_size,
                                  tokenizer.separator_id, packed=packed)

    train, validation = dataset(train_docs), dataset(validation_docs)
    train_tokens = sum(ids.numel() for ids in train.documents)
    validation_tokens = sum(ids.numel() for ids in validation.documents)
    return PreparedData(task="classify", tokenizer=tokenizer, train=train, validation=validation,
                        num_classes=len(label_names), label_names=list(label_names),
                        stats={"tokens": train_tokens + validation_tokens, "train_tokens": train_tokens,
                               "validation_tokens": validation_tokens,
                               "truncated": train.truncated + validation.truncated})


def _label_order(labels: set[str]):
    """Numeric order when every label is an integer ("2" before "10"), text order otherwise."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return int
    return str
