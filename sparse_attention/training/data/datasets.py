"""Datasets over tokenized documents: the train/validation split, packing, language-modeling
windows and classification batches (with packed documents, each attended alone: the op's
cu_seqlens in the batch)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch

from sparse_attention.documents import cu_seqlens_from_starts

Item = TypeVar("Item")


def split_documents(docs: Sequence[Item], validation_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded random split, each document on exactly one side, at least one on each side when
    there are two or more; a single document goes to train (the caller splits its tokens)."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"data: validation_fraction must be between 0 and 1 (exclusive), "
                         f"got {validation_fraction}")
    if len(docs) < 2:
        return list(docs), []
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    num_validation = min(max(1, round(validation_fraction * len(docs))), len(docs) - 1)
    validation = sorted(order[:num_validation])  # the corpus order within each side
    train = sorted(order[num_validation:])
    return [docs[i] for i in train], [docs[i] for i in validation]


def pack_documents(encoded: Iterable[Sequence[int] | torch.Tensor], separator_id: int) -> torch.Tensor:
    """One 1-D int64 stream: doc0 SEP doc1 SEP ... (each document followed by the separator)."""
    separator = torch.tensor([separator_id], dtype=torch.int64)
    pieces = []
    for ids in encoded:
        pieces += [torch.as_tensor(ids, dtype=torch.int64), separator]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


class LanguageModelingData(torch.utils.data.Dataset):
    """Non-overlapping windows of a token stream; item i is (input_ids, targets), the targets
    being the inputs shifted by one token.

    separator_id: with it, batches hold cu_seqlens (over their rows taken one after another)
    that start a document at every separator (and every row): a document's last token
    predicts the separator (its end), the separator alone predicts the next document's first
    token, and no token sees another document's."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, *, name: str = "data",
                 separator_id: int | None = None):
        if tokens.dim() != 1:
            raise ValueError(f"data: {name} tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise ValueError(f"data: seq_len must be positive, got {seq_len}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"data: {name} has {tokens.numel()} tokens, fewer than seq_len + 1 "
                             f"({seq_len + 1}): give more text or a shorter seq_len")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.separator_id = separator_id

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"data: index {index} out of range for {len(self)} sequences")
        start = (index % len(self)) * self.seq_len
        return (self.tokens[start:start + self.seq_len],
                self.tokens[start + 1:start + self.seq_len + 1])

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        starts = torch.as_tensor(indices, dtype=torch.int64) * self.seq_len
        positions = starts[:, None] + torch.arange(self.seq_len)
        batch = {"input_ids": self.tokens[positions], "targets": self.tokens[positions + 1]}
        if self.separator_id is not None:
            starts = batch["input_ids"] == self.separator_id
            starts[:, 0] = True
            batch["cu_seqlens"] = cu_seqlens_from_starts(starts.flatten())
        return batch


class ClassificationData(torch.utils.data.Dataset):
    """Documents with integer labels; longer than seq_len ones are truncated (counted in
    `truncated`). Batches are padded to a multiple of block_size, the attention's block, or
    with packed=True laid side by side in one row without padding, with their cu_seqlens."""

    def __init__(self, encoded: Sequence[Sequence[int] | torch.Tensor], labels: Sequence[int],
                 seq_len: int, block_size: int, pad_id: int, *, packed: bool = False):
        if len(encoded) != len(labels):
            raise ValueError(f"data: {len(encoded)} documents but {len(labels)} labels")
        if seq_len < 1 or block_size < 1:
            raise ValueError(f"data: seq_len and block_size must be positive, got {seq_len} and {block_size}")
        documents = [torch.as_tensor(ids, dtype=torch.int64) for ids in encoded]
        if any(ids.numel() == 0 for ids in documents):
            raise ValueError("data: a classification document encodes to no tokens")
        self.truncated = sum(ids.numel() > seq_len for ids in documents)
        self.documents = [ids[:seq_len] for ids in documents]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.seq_len = seq_len
        self.block_size = block_size
        self.pad_id = pad_id
        self.packed = packed

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.documents[index], int(self.labels[index])

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        documents = [self.documents[i] for i in indices]
        labels = self.labels[torch.as_tensor(list(indices), dtype=torch.int64)]
        if self.packed:
            lengths = torch.tensor([ids.numel() for ids in documents])
            cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return {"input_ids": torch.cat(documents)[None], "cu_seqlens": cu_seqlens,
                    "labels": labels}
        length = math.ceil(max(ids.numel() for ids in documents) / self.block_size) * self.block_size
        input_ids = torch.full((len(documents), length), self.pad_id, dtype=torch.int64)
        padding = torch.ones(len(documents), length, dtype=torch.bool)
        for row, ids in enumerate(documents):
            input_ids[row, :ids.numel()] = ids
            padding[row, :ids.numel()] = False
        return {"input_ids": input_ids, "key_padding_mask": padding, "labels": labels}
