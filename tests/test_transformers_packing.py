"""transformers integration, packed batches: documents side by side in one row (position_ids
that restart, as DataCollatorWithFlattening gives, or its cu_seq_lens_q / cu_seq_lens_k
kwargs) run on the op's cu_seqlens, never the dense fallback, and equal transformers' own
results on every document run alone: causal LMs (GQA, sliding window) and encoders (BERT,
RoBERTa's positions from 2), logits and gradients."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from conftest import require_module

transformers = require_module("transformers")

from transformers import DataCollatorWithFlattening, masking_utils  # noqa: E402

from sparse_attention.integrations.transformers import (  # noqa: E402
    TokenRules, register, token_rules_mask,
)
from test_transformers_integration import (  # noqa: E402
    BLOCK, SPARSE_PATTERN, VOCAB, assert_close, build,
)

# Any dense fallback is a failure here.
pytestmark = pytest.mark.filterwarnings("error:sparse_attention.*dense SDPA:UserWarning")

DENSE = "sparse_attention_packing_dense"
SPARSE = "sparse_attention_packing_sparse"
# One token, a block and one, and longer documents; 150 tokens in all.
LENGTHS = [70, 1, BLOCK + 1, 46]


@pytest.fixture(scope="module", autouse=True)
def implementations():
    register(DENSE, pattern=sa.Dense(block_size=BLOCK))
    register(SPARSE, pattern=SPARSE_PATTERN)


def documents(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def flattened(docs, **collator):
    """DataCollatorWithFlattening's batch of the documents (one row)."""
    return DataCollatorWithFlattening(return_tensors="pt", **collator)(
        [{"input_ids": d.tolist()} for d in docs])


def one_by_one(model, docs, **kwargs):
    """Logits of every document run alone, side by side [1, total, vocab]."""
    return torch.cat([model(d[None], **kwargs).logits for d in docs], dim=1)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_causal_lm_packed_by_position_ids_matches_each_document_alone(family, use_cache):
    """Without a cache transformers' own mask separates the documents; with a fresh one
    (use_cache defaults to True) it does not, and they are found in the position_ids, as
    its FlashAttention path finds them."""
    expected_model = build(family, "sdpa").eval()
    model = build(family, DENSE, like=expected_model).eval()
    docs = documents(LENGTHS + ([60] if family == "mistral" else []))  # past its window of 48
    batch = flattened(docs)
    with torch.no_grad():
        expected = one_by_one(expected_model, docs, use_cache=False)
        actual = model(batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=use_cache).logits
        assert_close(actual, expected, 1e-4)
        # Documents do see each other without the position_ids.
        crossed = model(batch["input_ids"], use_cache=False).logits
        assert (crossed - expected).abs().max() > 1e-3


@pytest.mark.parametrize("family, start", [("bert", 0), ("roberta", 2)])
@pytest.mark.parametrize("kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_encoder_packed_matches_each_document_alone(family, start, kwargs):
    """Encoders' masks ignore position_ids in transformers; documents are found in them as
    its FlashAttention path finds them."""
    expected_model = build(family, "sdpa").eval()
    model = build(family, DENSE, like=expected_model).eval()
    docs = documents(LENGTHS, seed=1)
    batch = flattened(docs, return_flash_attn_kwargs=kwargs, position_ids_start=start)
    batch.pop("labels")
    with torch.no_grad():
        expected = one_by_one(expected_model, docs)
        assert_close(model(**batch).logits, expected, 1e-4)


def test_cu_seq_lens_kwargs_alone_separate_the_documents():
    """The kwargs decide, as for FlashAttention: positions still count across the row."""
    expected_model = build("bert", "sdpa").eval()
    model = build("bert", DENSE, like=expected_model).eval()
    docs = documents([50, 100], seed=2)
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, 50, 150])
    with torch.no_grad():
        expected = torch.cat([expected_model(ids[:, :50]).logits,
                              expected_model(ids[:, 50:], position_ids=torch.arange(50, 150)[None]
                                             ).logits], dim=1)
        actual = model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=100,
                       max_length_k=100).logits
    assert_close(actual, expected, 1e-4)


def test_sparse_pattern_per_document_with_gradients():
    """The pattern is laid over every document from its own start: packed logits and
    gradients equal the sum over the documents run alone on the op."""
    model = build("llama", SPARSE)
    docs = documents([BLOCK * 3 + 5, 2 * BLOCK, BLOCK * 4 + 9], seed=3)
    batch = flattened(docs)
    packed = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    packed.square().mean().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = one_by_one(model, docs, use_cache=False)
    alone.square().mean().backward()
    assert_close(packed.detach(), alone.detach(), 1e-4)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert_close(packed_grads[name], parameter.grad, 1e-4)


def test_rows_of_packed_documents():
    """position_ids [B, N] that restart in each row: every row's documents alone."""
    expected_model = build("llama", "sdpa").eval()
    model = build("llama", DENSE, like=expected_model).eval()
    rows = [[70, 80], [20, 1, 129]]
    docs = [documents(lengths, seed=4 + r) for r, lengths in enumerate(rows)]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    with torch.no_grad():
        actual = model(ids, position_ids=positions, use_cache=False).logits
        for r, row in enumerate(docs):
            assert_close(actual[r:r + 1], one_by_one(expected_model, row, use_cache=False), 1e-4)


@pytest.mark.parametrize("within, rule", [
    (masking_utils.causal_mask_function, (True, None)),
    (masking_utils.sliding_window_causal_mask_function(8), (True, (7, None))),
])
def test_transformers_packed_masks_are_token_rules_with_documents(within, rule):
    """create_causal_mask's packed form: the mask within each document, and the documents."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    documents = masking_utils.find_packed_sequence_indices(positions)
    packed = masking_utils.and_masks(
        masking_utils.remap_positions_for_packed_sequence(within, positions),
        masking_utils.packed_sequence_mask_function(documents))
    rules = token_rules_mask(batch_size=1, q_length=10, kv_length=10, mask_function=packed)
    assert isinstance(rules, TokenRules) and (rules.causal, rules.window) == rule
    assert rules.documents is documents and rules.key_count == 10


def test_padding_mask_with_cu_seq_lens_is_refused():
    model = build("bert", DENSE).eval()
    ids = torch.randint(2, VOCAB, (1, 40))
    cu = torch.tensor([0, 10, 40])
    with pytest.raises(ValueError, match="cu_seq_lens_q: .*attention_mask=None"):
        model(ids, attention_mask=torch.ones(1, 40), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_model_follows_new_documents_without_recompiling(family):
    """Under torch.compile the documents are read from the position_ids of every call (the
    LM with its default fresh cache, whose mask transformers builds without packing)."""
    model = build(family, SPARSE).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for seed, lengths in enumerate([[100, 50], [30, 1, 119]]):
        docs = documents(lengths, seed=seed)
        batch = flattened(docs)
        with torch.no_grad(), torch.compiler.set_stance("default" if seed == 0 else
                                                        "fail_on_recompile"):
            actual = compiled(batch["input_ids"], position_ids=batch["position_ids"]).logits
        with torch.no_grad():
            assert_close(actual, one_by_one(model, docs), 1e-4)
