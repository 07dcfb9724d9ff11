"""The training data pipeline: documents from a source, tokenizers, datasets, the resumable
sampler, and `prepare_data`, which puts them together for a run."""

from sparse_attention.training.data.datasets import (ClassificationData, LanguageModelingData,
                                                      pack_documents, split_documents)
from sparse_attention.training.data.prepare import PreparedData, prepare_data
from sparse_attention.training.data.sampler import ResumableSampler
from sparse_attention.training.data.sources import Document, default_corpus_files, read_documents
from sparse_attention.training.data.tokenizer import (BPETokenizer, ByteTokenizer, PretrainedTokenizer,
                                                       Tokenizer, build_tokenizer, load_tokenizer,
                                                       save_tokenizer)

__all__ = ["BPETokenizer", "ByteTokenizer", "ClassificationData", "Document", "LanguageModelingData",
           "PreparedData", "PretrainedTokenizer", "ResumableSampler", "Tokenizer", "build_tokenizer",
           "default_corpus_files", "load_tokenizer", "pack_documents", "prepare_data", "read_documents",
           "save_tokenizer", "split_documents"]
