"""`sparse-attention train --packing documents`: the batches' cu_seqlens start a document at
every separator (language modelling) or lay a batch's documents in one row (classification),
no document's scores depend on another's, the report says which packing ran, and the
default stays the windows of today (bad packing settings: tests/test_training.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sparse_attention import cli
from sparse_attention.models import SparseTransformerConfig, SparseTransformerLM
from sparse_attention.training.data import ClassificationData, LanguageModelingData
from sparse_attention.training.evaluation import forward
from test_training import TINY, train, write_corpus

SEP = 0


def test_language_modeling_batches_start_a_document_at_every_separator():
    tokens = torch.tensor([5, 6, SEP, 7, 8, 9, SEP, SEP, 4, 3, 2, 1, 6])
    data = LanguageModelingData(tokens, seq_len=6, separator_id=SEP)
    batch = data.collate([0, 1])
    # Rows [5 6 S 7 8 9] and [S S 4 3 2 1]: documents 5 6 | S 7 8 9 | S | S 4 3 2 1.
    assert batch["cu_seqlens"].tolist() == [0, 2, 6, 7, 12]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert "cu_seqlens" not in LanguageModelingData(tokens, seq_len=6).collate([0])


def test_a_documents_loss_does_not_depend_on_the_others():
    torch.manual_seed(0)
    model = SparseTransformerLM(SparseTransformerConfig(
        vocab_size=20, max_seq_len=64, d_model=32, num_layers=2, num_heads=2, block_size=32,
        pattern="fixed", sdpa_max_len=0))
    g = torch.Generator().manual_seed(0)
    last = torch.randint(1, 20, (30,), generator=g)

    def scores(before: torch.Tensor, separator_id=SEP) -> torch.Tensor:
        """The logits of the separator and the document after it, `before` ahead of them."""
        stream = torch.cat([before, torch.tensor([SEP]), last, torch.tensor([SEP])])
        data = LanguageModelingData(stream, seq_len=64, separator_id=separator_id)
        return forward(model, data.collate([0])).logits[0, 33:]

    one, two = (torch.randint(1, 20, (33,), generator=g) for _ in range(2))
    torch.testing.assert_close(scores(one), scores(two))
    assert (scores(one, None) - scores(two, None)).abs().max() > 1e-3  # without packing


def test_classification_batches_share_one_row():
    data = ClassificationData([[1, 2, 3], [4] * 40, [5]], [0, 1, 1], seq_len=20, block_size=8,
                              pad_id=99, packed=True)
    batch = data.collate([2, 0, 1])
    assert batch["input_ids"].tolist() == [[5, 1, 2, 3] + [4] * 20]  # no padding, truncated
    assert batch["cu_seqlens"].tolist() == [0, 1, 4, 24]
    assert batch["labels"].tolist() == [1, 0, 1] and "key_padding_mask" not in batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), documents=12, words=120)


@pytest.mark.parametrize("packing", [None, "documents"])
def test_lm_runs_and_the_report_says_which_packing(corpus, tmp_path, capsys, packing):
    flags = ["--packing", packing] if packing else []
    train("--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3",
          "--eval-every", "3", *flags)
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    said = "attended alone" if packing else "attend to each other across the separator"
    assert said in report and said in capsys.readouterr().out
    assert f"| packing | {packing or 'none'} |" in report
    scores = cli.run(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus),
                      "--device", "cpu"])
    assert scores["bits_per_byte"] > 0


def test_classify_with_packed_documents(tmp_path):
    rng = random.Random(1)
    lines = [json.dumps({"text": "".join(rng.choice("ab ") for _ in range(rng.randint(5, 90))),
                         "label": rng.choice(["x", "y"])}) for _ in range(40)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "classify"
    cli.run(["train", *TINY, "--task", "classify", "--pattern", "local", "--data", str(data),
             "--out", str(out), "--steps", "3", "--eval-every", "3", "--packing", "documents",
             "--validation-fraction", "0.2"])
    assert "share one row without padding" in (out / "report" / "report.md").read_text()


def test_a_resumed_run_keeps_its_packing(corpus, tmp_path):
    out = tmp_path / "run"
    train("--data", str(corpus), "--out", str(out), "--steps", "1")
    with pytest.raises(ValueError, match="packing: 'none' -> 'documents'"):
        train("--out", str(out), "--resume", "--steps", "2", "--packing", "documents")
