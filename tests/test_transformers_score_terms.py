"""transformers integration, score terms: Gemma 2's logit soft-capping (`softcap`), gpt-oss's
attention sinks (`s_aux`) and attention dropout in training run on the op.

Tiny configs (nothing downloaded), each with a sliding-window and a full layer. With the dense
pattern, logits and every parameter's gradient (the sinks' too) equal transformers' own eager
attention, with and without padding, in fp32 and fp64; with a per-head sparse pattern they
equal attention written out with transformers' full mask intersected with the pattern (the
dense fallback, itself checked against eager under a custom 4D mask). Cached decoding equals
the full forward pass. Dropout runs on the kernels in training, repeatably under
torch.manual_seed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from sparse_attention.integrations import TRANSFORMERS_MINIMUM_VERSION
from conftest import require_module

transformers = require_module("transformers", minversion=TRANSFORMERS_MINIMUM_VERSION)

from transformers import (  # noqa: E402
    AttentionInterface, AutoModelForCausalLM, DynamicCache, Gemma2Config, GptOssConfig,
)
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from sparse_attention.integrations.transformers import PositionedMask, register  # noqa: E402
from sparse_attention.integrations.transformers.fallback import masked_dense_attention  # noqa: E402
from sparse_attention.integrations.transformers.terms import model_terms  # noqa: E402
from test_transformers_integration import (  # noqa: E402
    BLOCK, SPARSE_PATTERN, VOCAB, assert_close, decode_in_steps, inputs, oracle_mask, valid,
)

# Only the tests that ask for the dense fallback may take it.
pytestmark = pytest.mark.filterwarnings("error:sparse_attention.*dense SDPA:UserWarning")

DENSE = "sparse_attention_terms_dense"
SPARSE = "sparse_attention_terms_sparse"
ORACLE = "sparse_attention_terms_oracle"
NO_DROPOUT = "sparse_attention_terms_no_dropout"
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=48,
             layer_types=["sliding_attention", "full_attention"])


def gemma2_config(**changes):
    # initializer_range 0.1: scores large enough for a soft-cap of 2 to change the logits.
    return Gemma2Config(**{**SMALL, **dict(intermediate_size=128, attn_logit_softcapping=2.0,
                                           final_logit_softcapping=None, query_pre_attn_scalar=16,
                                           initializer_range=0.1), **changes})


def gpt_oss_config(**changes):
    return GptOssConfig(**{**SMALL, **dict(intermediate_size=64, num_local_experts=4,
                                           num_experts_per_tok=2,
                                           rope_parameters={"rope_type": "default",
                                                            "rope_theta": 10000.0}),
                           **changes})


# family: (config, from_config arguments); gpt-oss's experts as a loop, which takes fp64.
FAMILIES = {"gemma2": (gemma2_config, {}),
            "gpt_oss": (gpt_oss_config, {"experts_implementation": "eager"})}
# Eager Gemma 2 takes its softmax in fp32 even for fp64 inputs.
FP64_TOLERANCE = {"gemma2": 1e-6, "gpt_oss": 1e-10}


def oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """Attention written out with transformers' full mask, the pattern's element mask and the
    call's score terms."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        terms = model_terms(module, dropout, False, kwargs)
        return masked_dense_attention(module, query, key, value, attention_mask, SPARSE_PATTERN,
                                      scaling, "the oracle", terms)


@pytest.fixture(scope="module", autouse=True)
def implementations():
    register(DENSE, pattern=sa.Dense(block_size=BLOCK))
    register(SPARSE, pattern=SPARSE_PATTERN)
    register(NO_DROPOUT, pattern=sa.Dense(block_size=BLOCK), ignore_dropout=True)
    AttentionInterface.register(ORACLE, oracle_attention)
    AttentionMaskInterface.register(ORACLE, oracle_mask)


def build(family, implementation, like=None, dtype=torch.float32, **changes):
    make_config, arguments = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(**changes),
                                             attn_implementation=implementation, **arguments)
    model.to(dtype)
    if like is not None:
        model.load_state_dict(like.state_dict())
    elif family == "gpt_oss":
        # Sinks of a few units (the initialisation gives about 0.02) weigh in every row.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape))
    return model


def probe_loss(logits, mask):
    """A loss over the rows that are not padding (where a row that sees no key gives 0 here,
    eager attention gives the mean of the values), with weights that make every logit count."""
    rows = valid(logits, mask)
    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7), dtype=rows.dtype)
    return (rows * weights).sum()


def step(model, ids, mask, attention_mask=None):
    """The logits of the rows that are not padding (mask [B, N]), and every parameter's
    gradient of the probe loss; attention_mask: the model's mask if not mask."""
    model.zero_grad()
    logits = model(ids, attention_mask=mask if attention_mask is None else attention_mask).logits
    probe_loss(logits, mask).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return valid(logits.detach(), mask), grads


def assert_same_step(actual, expected, tolerance):
    (logits, grads), (expected_logits, expected_grads) = actual, expected
    assert_close(logits, expected_logits, tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], tolerance)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding, dtype", [("none", torch.float32), ("right", torch.float32),
                                            ("left", torch.float32), ("right", torch.float64)])
def test_dense_pattern_matches_eager(family, padding, dtype):
    expected_model = build(family, "eager", dtype=dtype).train()
    model = build(family, DENSE, like=expected_model, dtype=dtype).train()
    ids, mask = inputs(padding=padding)
    ours, theirs = step(model, ids, mask), step(expected_model, ids, mask)
    assert_same_step(ours, theirs, 1e-4 if dtype == torch.float32 else FP64_TOLERANCE[family])
    if family == "gpt_oss":
        assert all(f"model.layers.{i}.self_attn.sinks" in ours[1] for i in range(2))


@pytest.mark.parametrize("family, change", [("gemma2", dict(attn_logit_softcapping=None)),
                                            ("gpt_oss", None)])
def test_the_terms_change_the_logits(family, change):
    """Soft-capping and the sinks matter in these configs: without them the logits differ."""
    model = build(family, DENSE).eval()
    if change is None:
        without = build(family, DENSE, like=model).eval()
        with torch.no_grad():
            for layer in without.model.layers:
                layer.self_attn.sinks.fill_(-torch.inf)  # a sink of weight 0
    else:
        without = build(family, DENSE, like=model, **change).eval()
    ids, mask = inputs(padding="none")
    with torch.no_grad():
        assert (model(ids).logits - without(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_pattern_matches_masked_reference(family):
    expected_model = build(family, ORACLE).train()
    model = build(family, SPARSE, like=expected_model).train()
    ids, mask = inputs(seq=200, padding="right", seed=2)
    assert_same_step(step(model, ids, mask), step(expected_model, ids, mask), 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_fallback_with_terms_matches_eager(family):
    """A custom 4D mask (two causal documents) takes the dense fallback, which computes the
    terms itself, as eager attention does."""
    expected_model = build(family, "eager").train()
    model = build(family, DENSE, like=expected_model).train()
    ids, _ = inputs(batch=2, padding="none")
    seq = ids.shape[1]
    position = torch.arange(seq)
    document = (position >= 70).long()
    keep = (document[:, None] == document[None, :]) & (position[None, :] <= position[:, None])
    custom = torch.zeros(2, 1, seq, seq).masked_fill(~keep, torch.finfo(torch.float32).min)
    mask = torch.ones_like(ids)
    theirs = step(expected_model, ids, mask, attention_mask=custom)
    with pytest.warns(UserWarning, match="dense SDPA"):
        ours = step(model, ids, mask, attention_mask=custom)
    assert_same_step(ours, theirs, 1e-4)


@pytest.mark.parametrize("family, implementation", [("gemma2", DENSE), ("gpt_oss", DENSE),
                                                    ("gpt_oss", SPARSE)])
def test_decoding_with_a_cache_matches_the_full_forward(family, implementation):
    """Sinks and soft-capping with Nq < Nk: prefill, a chunk, then single tokens; the sliding
    layers' cache drops keys past the window (with a sparse pattern those calls take the dense
    fallback, with the terms)."""
    model = build(family, implementation).eval()
    splits = [130, 20, 1, 1, 1]
    ids, _ = inputs(batch=1, seq=sum(splits), padding="none")
    with torch.no_grad():
        full = model(ids).logits
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sparse_attention.*sliding-window cache")
        steps = decode_in_steps(model, ids, DynamicCache(config=model.config), splits)
    assert_close(steps, full, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_match_each_document_alone(family):
    """Documents packed in one row (position_ids that restart) run on the op's cu_seqlens with
    the terms, as each document alone through eager attention; the sinks get the gradient."""
    expected_model = build(family, "eager")
    model = build(family, DENSE, like=expected_model)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(2, VOCAB, (n,), generator=g) for n in (70, 1, BLOCK + 1, 60)]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    weights = torch.randn(1, ids.shape[1], VOCAB, generator=g)
    model(ids, position_ids=position_ids, use_cache=False).logits.mul(weights).sum().backward()
    expected = torch.cat([expected_model(d[None]).logits for d in docs], dim=1)
    expected.mul(weights).sum().backward()
    with torch.no_grad():
        actual = model(ids, position_ids=position_ids, use_cache=False).logits
    assert_close(actual, expected.detach(), 1e-4)
    grads = dict(expected_model.named_parameters())
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert_close(parameter.grad, grads[name].grad, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dropout_in_training_runs_on_the_op(family):
    model = build(family, DENSE, attention_dropout=0.3).train()
    ids, mask = inputs(padding="right")
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(step(model, ids, mask))
    assert_same_step(runs[1], runs[0], 0.0)  # torch.manual_seed repeats the run
    assert (runs[2][0] - runs[0][0]).abs().max() > 1e-3
    assert all(torch.isfinite(grad).all() for grad in runs[0][1].values())
    with torch.no_grad():
        evaluated = valid(model.eval()(ids, attention_mask=mask).logits, mask)
    assert (runs[0][0] - evaluated).abs().max() > 1e-3
    # ignore_dropout: training without it gives what evaluation gives.
    model.set_attn_implementation(NO_DROPOUT)
    with torch.no_grad():
        assert_close(valid(model.train()(ids, attention_mask=mask).logits, mask), evaluated, 1e-6)


def test_direct_call_with_terms_matches_the_reference():
    model = build("gpt_oss", DENSE).train()
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 70, 16, generator=g, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    torch.manual_seed(4)
    ours, weights = AttentionInterface()[DENSE](module, q, k, v, None, dropout=0.2, scaling=0.3,
                                                softcap=1.5, s_aux=sinks, sliding_window=20)
    torch.manual_seed(4)
    expected = reference.attention(q, k, v, sa.Dense(block_size=BLOCK).layout(70, 70), causal=True,
                                   window=(19, 0), scale=0.3, softcap=1.5, sinks=sinks,
                                   dropout_p=0.2, seed=None)
    assert ours.shape == (2, 70, 4, 16) and weights is None
    assert_close(ours, expected.transpose(1, 2), 1e-12)
    # Outside training there is no dropout, as in eager attention.
    ours = AttentionInterface()[DENSE](module.eval(), q, k, v, None, dropout=0.2, scaling=0.3)[0]
    expected = reference.attention(q, k, v, sa.Dense(block_size=BLOCK).layout(70, 70), causal=True,
                                   scale=0.3)
    assert_close(ours, expected.transpose(1, 2), 1e-12)


@pytest.mark.parametrize("sinks", [False, True])
def test_dense_fallback_terms_match_the_reference(sinks):
    """Soft-capping and sinks in the fallback, under a mask whose left-padded rows see no key
    (they give 0 and no NaN, as from the op), with gradients."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    sink_logits = torch.randn(4, generator=g, dtype=torch.float64) if sinks else None
    terms = dict(softcap=1.5, sinks=sink_logits, dropout_p=0.0)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, :5] = True
    mask = torch.ones(20, 20, dtype=torch.bool).tril() & ~padding[:, None, None, :]
    dense = sa.Dense(block_size=BLOCK)
    with pytest.warns(UserWarning, match="dense SDPA"):
        ours = masked_dense_attention(torch.nn.Module(), q, k, v, PositionedMask(mask, 0, 0),
                                      dense, 0.4, "the test", terms)[0]
    expected = reference.attention(q, k, v, dense.layout(20, 20), causal=True, scale=0.4,
                                   key_padding_mask=padding, **terms).transpose(1, 2)
    assert_close(ours, expected, 1e-12)
    assert not ours[1, :5].any()
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)),
                    torch.autograd.grad(expected.sum(), (q, k, v))):
        assert_close(a, b, 1e-12)
