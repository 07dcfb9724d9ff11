"""Packed documents (cu_seqlens) through the drop-in modules and the models: outputs,
losses and gradients equal those of every document run alone (positions restart per
document), rows packed one after another, torch.compile without recompiling, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.models import (
    KVCache, SparseClassifierConfig, SparseTransformerClassifier, SparseTransformerConfig,
    SparseTransformerLM,
)
from sparse_attention.nn import SparseMultiheadAttention, SparseSelfAttention

BLOCK = 32
# One token, an empty document, lengths around the block size, a long one: 200 tokens.
LENGTHS = [70, 1, BLOCK + 1, 0, 96]


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def tokens(n=sum(LENGTHS), rows=1, seed=0):
    return torch.randint(0, 50, (rows, n), generator=torch.Generator().manual_seed(seed))


def pieces(t: torch.Tensor, lengths, dim: int):
    """The non-empty documents of t along dim."""
    return [piece for piece in t.split(lengths, dim) if piece.shape[dim]]


def lm(**changes) -> SparseTransformerLM:
    values = dict(vocab_size=50, max_seq_len=128, d_model=64, num_layers=2, num_heads=4,
                  block_size=BLOCK, pattern="fixed", sdpa_max_len=0)
    torch.manual_seed(0)
    return SparseTransformerLM(SparseTransformerConfig(**{**values, **changes}))


def classifier(**changes) -> SparseTransformerClassifier:
    values = dict(vocab_size=50, max_seq_len=128, d_model=64, num_layers=2, num_heads=4,
                  block_size=BLOCK, pattern="fixed", num_classes=3, sdpa_max_len=0)
    torch.manual_seed(0)
    return SparseTransformerClassifier(SparseClassifierConfig(**{**values, **changes}))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_documents_alone(batch_first, causal):
    module = SparseMultiheadAttention(64, 4, batch_first=batch_first,
                                      pattern=sa.Local(2, block_size=BLOCK))
    dim = 1 if batch_first else 0
    x = torch.randn(1, sum(LENGTHS), 64).transpose(0, 1 - dim).requires_grad_()
    packed, _ = module(x, x, x, is_causal=causal, cu_seqlens=offsets(LENGTHS))
    assert module.attention_path == "sparse"
    alone = torch.cat([module(d, d, d, is_causal=causal)[0] for d in pieces(x, LENGTHS, dim)],
                      dim=dim)
    torch.testing.assert_close(packed, alone)
    grads = [torch.autograd.grad(y.square().sum(), x)[0] for y in (packed, alone)]
    torch.testing.assert_close(*grads)


def test_self_attention_documents_alone_with_keys_laid_out_otherwise():
    module = SparseSelfAttention(sa.FixedSparsityConfig(4, block=BLOCK))
    q_lengths, k_lengths = [40, 0, 90], [50, 20, 70]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, sum(q_lengths), 16, generator=g)
    k, v = (torch.randn(1, 4, sum(k_lengths), 16, generator=g) for _ in range(2))
    packed = module(q, k, v, cu_seqlens=offsets(q_lengths), cu_seqlens_k=offsets(k_lengths))
    alone = [sa.sparse_attention(q[:, :, :40], k[:, :, :50], v[:, :, :50], module.sparsity_config),
             sa.sparse_attention(q[:, :, 40:], k[:, :, 70:], v[:, :, 70:], module.sparsity_config)]
    torch.testing.assert_close(packed, torch.cat(alone, dim=2))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_lm_documents_alone_logits_loss_and_gradients(positions):
    model = lm(positions=positions)
    x = tokens()
    packed = model(x, labels=x, cu_seqlens=offsets(LENGTHS))
    packed.loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    outs = [model(d, labels=d) for d in pieces(x, LENGTHS, 1)]
    torch.testing.assert_close(packed.logits, torch.cat([o.logits for o in outs], dim=1))
    # The packed loss is the mean over every document's scored tokens (a 1-token one has none).
    scored = [d.shape[1] - 1 for d in pieces(x, LENGTHS, 1)]
    alone = sum(o.loss * n for o, n in zip(outs, scored) if n) / sum(scored)
    torch.testing.assert_close(packed.loss, alone)
    alone.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], parameter.grad, msg=name)


def test_rows_packed_one_after_another_and_longer_than_max_seq_len():
    """max_seq_len bounds each document; the rows are one sequence of documents."""
    model = lm(positions="rotary", gradient_checkpointing=True)
    lengths = [100, 28, 128, 0, 44]
    x = tokens(n=150, rows=2, seed=2)
    packed = model(x, cu_seqlens=offsets(lengths)).logits
    alone = torch.cat([model(d).logits for d in pieces(x.view(1, -1), lengths, 1)], dim=1)
    torch.testing.assert_close(packed.view(1, 300, -1), alone)
    model.train()
    model(x, labels=x, cu_seqlens=offsets(lengths)).loss.backward()  # checkpointed blocks


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classifier_one_prediction_per_document(pooling):
    model = classifier(pooling=pooling)
    x = tokens(seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = model(x, labels=labels, cu_seqlens=offsets(LENGTHS))
    assert out.logits.shape == (5, 3)
    alone = torch.cat([model(d).logits for d in pieces(x, LENGTHS, 1)])
    filled = [i for i, n in enumerate(LENGTHS) if n]
    torch.testing.assert_close(out.logits[filled], alone)
    assert torch.equal(out.logits[3], model.head.bias)  # the empty document pools to zeros
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_compiled_lm_takes_new_documents_without_recompiling():
    model = lm(positions="rotary")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    x = tokens(seed=4)
    for i, lengths in enumerate([LENGTHS, [100, 50, 50, 0, 0]]):
        # The first call compiles; the next may not.
        with torch.compiler.set_stance("default" if i == 0 else "fail_on_recompile"):
            out = compiled(x, labels=x, cu_seqlens=offsets(lengths))
        expected = model(x, labels=x, cu_seqlens=offsets(lengths))
        torch.testing.assert_close(out.logits, expected.logits)
        torch.testing.assert_close(out.loss, expected.loss)


def test_errors_name_cu_seqlens():
    model = lm()
    x = tokens()
    with pytest.raises(ValueError, match="cu_seqlens: a document of 130 tokens exceeds max_seq_len=128"):
        model(x, cu_seqlens=offsets([70, 130]))
    with pytest.raises(ValueError, match="cu_seqlens: must end at"):
        model(x, cu_seqlens=offsets([70, 100]))
    with pytest.raises(ValueError, match="cu_seqlens: not supported with a cache"):
        model(x, cache=KVCache(), cu_seqlens=offsets(LENGTHS))
    with pytest.raises(ValueError, match="cu_seqlens: packed documents take no padding mask"):
        classifier()(x, attention_mask=torch.ones_like(x), cu_seqlens=offsets(LENGTHS))
