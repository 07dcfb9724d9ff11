"""The training data pipeline: documents from a source, tokenizers, datasets, the resumable
sampler, and `prepare_data`, which puts them together for a run."""

from sparse_attention.training.data.sources import Document, default_corpus_files, read_documents

__all__ = ["Document", "default_corpus_files", "read_documents"]
