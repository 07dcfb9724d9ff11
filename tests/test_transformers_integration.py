"""transformers integration: models built from tiny configs (nothing downloaded) run on the op.

Dense pattern: logits and gradients equal transformers' SDPA implementation. Sparse patterns:
equal SDPA with transformers' full mask intersected with the pattern's element mask. Covered:
GPT-2 (per-layer scaling), Llama (GQA), Mistral (sliding window), Qwen2 (full and sliding
layers), Qwen3 (head_dim != hidden / heads), BERT and RoBERTa (bidirectional encoders); right
and left padding, decoding with dynamic, sliding-window and static caches, custom 4D masks,
bf16. Packed sequences: tests/test_transformers_packing.py; soft-capping, sinks and
dropout: tests/test_transformers_score_terms.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from sparse_attention.integrations import TRANSFORMERS_MINIMUM_VERSION
from conftest import require_module

transformers = require_module("transformers", minversion=TRANSFORMERS_MINIMUM_VERSION)

from transformers import (  # noqa: E402
    AttentionInterface, AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, DynamicCache,
    GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, RobertaConfig, StaticCache,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers import masking_utils  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from sparse_attention.integrations.transformers import (  # noqa: E402
    PositionedMask, TokenRules, extend_position_embeddings, register, sparsify, token_rules_mask,
)
from sparse_attention.integrations.transformers.fallback import masked_dense_attention  # noqa: E402

# The oracle takes the dense fallback on purpose, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:sparse_attention.*dense SDPA:UserWarning")

VOCAB = 97
SEQ = 150  # not a multiple of the block size: tails are exercised
BLOCK = 32
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, vocab_size=VOCAB)


def gpt2_config():
    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                      scale_attn_by_inverse_layer_idx=True)


def llama_config():
    return LlamaConfig(num_key_value_heads=2, **SMALL)


def mistral_config():
    return MistralConfig(num_key_value_heads=2, sliding_window=48, **SMALL)


def qwen2_config():
    return Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=40,
                       max_window_layers=1, **SMALL)


def qwen3_config():
    return Qwen3Config(num_key_value_heads=2, head_dim=24, **SMALL)


def bert_config():
    return BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL)


def roberta_config():
    return RobertaConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL)


FAMILIES = {
    "gpt2": (gpt2_config, AutoModelForCausalLM),
    "llama": (llama_config, AutoModelForCausalLM),
    "mistral": (mistral_config, AutoModelForCausalLM),
    "qwen2": (qwen2_config, AutoModelForCausalLM),
    "qwen3": (qwen3_config, AutoModelForCausalLM),
    "bert": (bert_config, AutoModelForMaskedLM),
    "roberta": (roberta_config, AutoModelForMaskedLM),
}

DENSE = "sparse_attention_test_dense"
SPARSE = "sparse_attention_test_sparse"
ORACLE = "sparse_attention_test_oracle"
FALLBACK = "sparse_attention_test_fallback"
# Per-head layouts (a random block per row differs by head), bidirectional by definition.
SPARSE_PATTERN = sa.BigBirdSparsityConfig(4, block=BLOCK, different_layout_per_head=True,
                                          num_random_blocks=1, num_sliding_window_blocks=1)


def full_sdpa_mask(**kwargs):
    """transformers' SDPA mask, always materialised (no is_causal shortcut)."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return masking_utils.sdpa_mask(**kwargs)


def oracle_mask(**kwargs):
    return PositionedMask(full_sdpa_mask(**kwargs), kwargs["q_offset"], kwargs["kv_offset"])


def oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA with transformers' own full mask and the pattern's element mask."""
    return masked_dense_attention(module, query, key, value, attention_mask, SPARSE_PATTERN, scaling,
                                  "the oracle")


def disguised_mask(**kwargs):
    """Our mask function, handed a causal mask function it does not recognise."""
    kwargs["mask_function"] = masking_utils.and_masks(kwargs["mask_function"])
    return token_rules_mask(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def implementations():
    register(DENSE, pattern=sa.Dense(block_size=BLOCK))
    register(SPARSE, pattern=SPARSE_PATTERN)
    AttentionInterface.register(ORACLE, oracle_attention)
    AttentionMaskInterface.register(ORACLE, oracle_mask)
    register(FALLBACK, pattern=SPARSE_PATTERN)
    AttentionMaskInterface.register(FALLBACK, disguised_mask)


def build(family: str, implementation: str, like=None, config=None):
    make_config, auto = FAMILIES[family]
    torch.manual_seed(0)
    model = auto.from_config(config or make_config(), attn_implementation=implementation)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def model_pair(family: str, implementation: str, reference_implementation: str = "sdpa"):
    expected = build(family, reference_implementation)
    return expected, build(family, implementation, like=expected)


def inputs(batch: int = 2, seq: int = SEQ, padding: str = "right", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)  # 0 and 1 are padding ids
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "right":
        mask[-1, seq - 37:] = 0
    elif padding == "left":
        mask[-1, :37] = 0
    return ids, mask


def valid(logits, mask):
    return logits[mask.bool()]


def assert_close(actual, expected, tolerance):
    assert torch.isfinite(actual).all()
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tolerance * max(scale, 1.0), f"max error {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_pattern_matches_sdpa(family, padding):
    expected_model, model = model_pair(family, DENSE)
    ids, mask = inputs(padding=padding)
    with torch.no_grad():
        expected = expected_model(ids, attention_mask=mask).logits
        actual = model(ids, attention_mask=mask).logits
    # Padded positions too: left-padded queries see no key and give 0 in both.
    assert_close(actual, expected, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_matches_sdpa(family):
    expected_model, model = model_pair(family, DENSE)
    ids, mask = inputs(padding="right")
    for m in (expected_model, model):
        m.train()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = dict(expected_model.named_parameters())
    for name, parameter in model.named_parameters():
        if grads[name].grad is not None:
            assert_close(parameter.grad, grads[name].grad, 1e-4)
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_pattern_matches_masked_reference(family):
    expected_model, model = model_pair(family, SPARSE, reference_implementation=ORACLE)
    ids, mask = inputs(seq=200, padding="right", seed=2)
    losses = []
    for m in (expected_model, model):
        m.train()
        out = m(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        losses.append(out)
    assert_close(losses[1].logits.detach(), losses[0].logits.detach(), 1e-4)
    grads = dict(expected_model.named_parameters())
    for name, parameter in model.named_parameters():
        if grads[name].grad is not None:
            assert_close(parameter.grad, grads[name].grad, 1e-4)
    # The pattern matters: dense attention gives other logits.
    dense = build(family, DENSE, like=expected_model)
    with torch.no_grad():
        assert (dense(ids, attention_mask=mask).logits - losses[1].logits).abs().max() > 1e-3


def test_sliding_window_is_applied():
    """Mistral's window (48 < 150 tokens) changes the logits, and ours follow SDPA's."""
    expected_model, model = model_pair("mistral", DENSE)
    ids, mask = inputs(padding="none")
    config = mistral_config()
    config.sliding_window = None
    no_window = build("mistral", DENSE, like=model, config=config)
    with torch.no_grad():
        actual = model(ids, attention_mask=mask).logits
        assert_close(actual, expected_model(ids, attention_mask=mask).logits, 1e-4)
        assert (no_window(ids, attention_mask=mask).logits - actual).abs().max() > 1e-3


def test_bf16_follows_the_flash_attention_rule():
    expected_model, model = model_pair("llama", DENSE)
    ids, mask = inputs(padding="right")
    with torch.no_grad():
        exact = expected_model(ids, attention_mask=mask).logits
        low = expected_model.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
        ours = model.to(torch.bfloat16)(ids, attention_mask=mask).logits.float()
    ours_error = (ours - exact).abs().max()
    sdpa_error = (low - exact).abs().max()
    assert ours_error <= 2 * sdpa_error + 1e-2, (ours_error, sdpa_error)


def decode_in_steps(model, ids, cache, splits):
    """Logits of ids fed in chunks of the given lengths through the cache."""
    logits, start = [], 0
    with torch.no_grad():
        for length in splits:
            chunk = ids[:, start:start + length]
            position = torch.arange(start, start + length).unsqueeze(0)
            out = model(chunk, cache=cache, use_cache=True, position_ids=position)
            logits.append(out.logits)
            start += length
    return torch.cat(logits, dim=1)


# Prefill, a chunk (Nq != Nk), then single tokens.
SPLITS = [130, 20, 1, 1, 1, 1]


@pytest.mark.parametrize("family, implementation", [("llama", SPARSE), ("qwen3", SPARSE),
                                                    ("llama", DENSE), ("mistral", DENSE),
                                                    ("qwen2", DENSE)])
def test_decoding_with_a_cache_matches_the_full_forward(family, implementation):
    """Patterns give exactly the last rows of the full layout; sliding-window caches (Mistral,
    Qwen2's sliding layers) drop keys past the window."""
    model = build(family, implementation).eval()
    ids, _ = inputs(batch=1, seq=sum(SPLITS), padding="none")
    with torch.no_grad():
        full = model(ids).logits
    steps = decode_in_steps(model, ids, DynamicCache(config=model.config), SPLITS)
    assert_close(steps, full, 1e-4)


def test_static_cache_matches_the_full_forward():
    """A static cache holds keys past the last query; they are dropped, not attended."""
    model = build("llama", SPARSE).eval()
    ids, _ = inputs(batch=1, seq=sum(SPLITS), padding="none")
    with torch.no_grad():
        full = model(ids).logits
    cache = StaticCache(config=model.config, max_cache_len=256)
    assert_close(decode_in_steps(model, ids, cache, SPLITS), full, 1e-4)


@pytest.mark.parametrize("family, cache", [("llama", "dynamic"), ("llama", "static"),
                                           ("mistral", "dynamic")])
def test_dense_fallback_places_the_pattern_at_the_cache_positions(family, cache):
    """Masks the op cannot express, while decoding: the pattern's rows and columns follow the
    queries' and keys' absolute positions (static caches hold extra keys, sliding-window caches
    drop the oldest)."""
    ours = build(family, SPARSE).eval()
    fallback = build(family, FALLBACK, like=ours).eval()
    ids, _ = inputs(batch=1, seq=sum(SPLITS), padding="none")
    with torch.no_grad():
        full = fallback(ids).logits
    if family == "llama":  # the op itself agrees (Mistral's sliding cache is refused by it)
        with torch.no_grad():
            assert_close(ours(ids).logits, full, 1e-4)
    caches = {"dynamic": lambda: DynamicCache(config=fallback.config),
              "static": lambda: StaticCache(config=fallback.config, max_cache_len=256)}
    with pytest.warns(UserWarning, match="dense SDPA"):
        steps = decode_in_steps(fallback, ids, caches[cache](), SPLITS)
    assert_close(steps, full, 1e-4)


def test_sparse_pattern_over_a_sliding_window_cache_takes_the_dense_fallback():
    """The cache dropped the oldest keys: the pattern's blocks no longer line up with the keys,
    so those calls run dense over the window's keys, and still equal the full forward pass."""
    model = build("mistral", SPARSE).eval()
    ids, _ = inputs(batch=1, seq=sum(SPLITS), padding="none")
    with torch.no_grad():
        full = model(ids).logits
    with pytest.warns(UserWarning, match="sliding-window cache"):
        steps = decode_in_steps(model, ids, DynamicCache(config=model.config), SPLITS)
    assert_close(steps, full, 1e-4)


def test_left_padded_generation_gives_no_nan():
    model = build("llama", SPARSE).eval()
    ids, mask = inputs(batch=2, seq=60, padding="left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 65)
    with torch.no_grad():
        assert torch.isfinite(model(out, attention_mask=torch.cat(
            [mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)).logits).all()


def test_custom_4d_mask_takes_the_dense_fallback():
    expected_model, model = model_pair("llama", DENSE)
    ids, _ = inputs(batch=2, padding="none")
    # Two causal documents side by side: a mask the op's rules cannot express.
    position = torch.arange(SEQ)
    document = (position >= 70).long()
    keep = (document[:, None] == document[None, :]) & (position[None, :] <= position[:, None])
    mask = torch.zeros(2, 1, SEQ, SEQ).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = expected_model(ids, attention_mask=mask).logits
        with pytest.warns(UserWarning, match="dense SDPA"):
            actual = model(ids, attention_mask=mask).logits
    assert_close(actual, expected, 1e-4)


def test_packed_sequences_under_an_unrecognised_mask_take_the_dense_fallback():
    """Packed documents run on the op (tests/test_transformers_packing.py); under a mask
    function the op does not know they still get the right result, densely."""
    expected_model, model = model_pair("llama", FALLBACK)
    ids, _ = inputs(batch=1, padding="none")
    position_ids = torch.cat([torch.arange(70), torch.arange(SEQ - 70)]).unsqueeze(0)
    with torch.no_grad():
        # Packing is detected without a cache only.
        expected = build("llama", ORACLE, like=expected_model)(
            ids, position_ids=position_ids, use_cache=False).logits
        with pytest.warns(UserWarning, match="dense SDPA"):
            actual = model(ids, position_ids=position_ids, use_cache=False).logits
    assert_close(actual, expected, 1e-4)


MASK_CASES = [
    # (mask function, q_length, kv_length, q_offset, kv_offset)
    (masking_utils.causal_mask_function, 100, 100, 0, 0),
    (masking_utils.causal_mask_function, 7, 130, 123, 0),          # chunked prefill
    (masking_utils.causal_mask_function, 1, 200, 130, 0),          # static cache, decoding
    (masking_utils.bidirectional_mask_function, 90, 90, 0, 0),
    (masking_utils.sliding_window_causal_mask_function(33), 100, 100, 0, 0),
    (masking_utils.sliding_window_causal_mask_function(33), 3, 35, 200, 168),  # dropped keys
    (masking_utils.sliding_window_bidirectional_mask_function(20), 90, 90, 0, 0),
]


@pytest.mark.parametrize("case", range(len(MASK_CASES)))
def test_token_rules_equal_transformers_masks(case):
    mask_function, q_length, kv_length, q_offset, kv_offset = MASK_CASES[case]
    g = torch.Generator().manual_seed(case)
    padding = torch.rand(3, kv_offset + kv_length, generator=g) > 0.2
    arguments = dict(batch_size=3, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=padding)
    expected = full_sdpa_mask(**arguments)
    rules = token_rules_mask(**arguments)
    assert isinstance(rules, TokenRules)
    layout = sa.Dense(block_size=16).layout(q_length, rules.key_count)
    actual = reference.element_mask(layout, q_length, rules.key_count, causal=rules.causal,
                                    window=rules.window, key_padding_mask=rules.key_padding_mask)
    # Keys the rules drop (past every query) must be invisible in transformers' mask too.
    assert not expected[..., rules.key_count:].any()
    assert torch.equal(actual, expected[..., :rules.key_count])


def test_other_mask_functions_are_materialised():
    chunked = masking_utils.chunked_causal_mask_function(16, torch.zeros(2, dtype=torch.long))
    overlay = masking_utils.or_masks(masking_utils.causal_mask_function,
                                     lambda b, h, q, kv: kv == 0)
    for mask_function in (chunked, overlay):
        arguments = dict(batch_size=2, q_length=40, kv_length=40, mask_function=mask_function)
        mask = token_rules_mask(**arguments)
        assert isinstance(mask, PositionedMask) and (mask.q_offset, mask.kv_offset) == (0, 0)
        assert torch.equal(mask.mask, full_sdpa_mask(**arguments))


def test_direct_call_shape_scaling_and_gqa():
    model = build("llama", DENSE)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 16, generator=g)
    k, v = torch.randn(2, 2, 70, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g)
    ours, weights = AttentionInterface()[DENSE](module, q, k, v, None, scaling=0.3)
    expected, _ = AttentionInterface()["sdpa"](module, q, k, v, None, scaling=0.3)
    assert ours.shape == (2, 70, 4, 16) and weights is None
    assert_close(ours, expected, 1e-5)


@pytest.mark.parametrize("family, first", [("bert", 0), ("roberta", 2)])
def test_encoder_sparsify_extends_position_embeddings(family, first):
    """As DeepSpeed did: the learned rows repeated (RoBERTa's positions start at row 2)."""
    def short_config():
        config = FAMILIES[family][0]()
        config.max_position_embeddings = 128 + first
        return config

    expected_model = build(family, "sdpa", config=short_config())
    model = build(family, "sdpa", like=expected_model, config=short_config())
    embeddings = model.base_model.embeddings
    original = embeddings.position_embeddings.weight.detach().clone()
    sparsify(model, sa.Dense(block_size=BLOCK), max_length=300, name=DENSE)
    table = embeddings.position_embeddings.weight
    assert table.shape == (300 + first, 64) and model.config.max_position_embeddings == 300 + first
    assert torch.equal(table[:128 + first], original)
    assert torch.equal(table[128 + first:256 + first], original[first:])
    assert torch.equal(table[256 + first:], original[first:first + 44])
    assert embeddings.position_ids.shape == (1, 300 + first)
    assert model.config._attn_implementation == DENSE
    assert extend_position_embeddings(expected_model, 300)
    ids, mask = inputs(seq=260, padding="right")
    with torch.no_grad():
        assert_close(model(ids, attention_mask=mask).logits,
                     expected_model(ids, attention_mask=mask).logits, 1e-4)


def test_gpt2_sparsify_runs_the_op_on_longer_inputs():
    config = gpt2_config()
    config.n_positions = 64
    model = build("gpt2", "sdpa", config=config)
    sparsify(model, SPARSE_PATTERN, max_length=200, name=SPARSE)
    assert model.transformer.wpe.weight.shape[0] == 200 and model.config.n_positions == 200
    ids, mask = inputs(seq=180, padding="right")
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_rotary_models_need_no_extension():
    model = build("llama", "sdpa")
    assert not extend_position_embeddings(model, 4096)
    assert model.config.max_position_embeddings == 512


def test_attention_dropout_in_training_is_applied_unless_ignored():
    """On the kernels (a dense pattern never takes SDPA here), repeatably under
    torch.manual_seed; ignore_dropout=True trains without it."""
    config = gpt2_config()
    config.attn_pdrop = 0.1
    model = build("gpt2", DENSE, config=config).train()
    ids, mask = inputs(padding="none")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model(ids, attention_mask=mask).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    runs[0].sum().backward()
    with torch.no_grad():
        evaluated = model.eval()(ids, attention_mask=mask).logits
    assert not torch.allclose(runs[0], evaluated)
    register("sparse_attention_test_no_dropout", pattern=sa.Dense(block_size=BLOCK),
             ignore_dropout=True)
    model.set_attn_implementation("sparse_attention_test_no_dropout")
    with torch.no_grad():
        assert_close(model.train()(ids, attention_mask=mask).logits, evaluated, 1e-6)


def test_pattern_for_another_head_count_is_refused():
    model = build("llama", "sdpa")
    pattern = sa.VariableSparsityConfig(8, block=BLOCK)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        sparsify(model, pattern, name="sparse_attention_test_heads")
    register("sparse_attention_test_heads", pattern=pattern)
    model.set_attn_implementation("sparse_attention_test_heads")
    with pytest.raises(ValueError, match="num_heads"):
        model(inputs()[0])


def test_unsupported_model_type_is_named():
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="model: t5 .*not supported"):
        sparsify(T5ForConditionalGeneration(config), sa.Dense(block_size=BLOCK))


def test_causal_pattern_in_an_encoder_is_refused():
    pattern = sa.FixedSparsityConfig(4, block=BLOCK, attention="unidirectional")
    register("sparse_attention_test_causal", pattern=pattern)
    model = build("bert", "sparse_attention_test_causal")
    with pytest.raises(ValueError, match="causal by definition"):
        model(inputs()[0])


@pytest.mark.parametrize("name", ["position_bias", "head_mask"])
def test_unsupported_arguments_are_refused(name):
    model = build("llama", DENSE)
    q = torch.randn(1, 4, 10, 16)
    k = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match=f"{name}: LlamaAttention asks for"):
        AttentionInterface()[DENSE](model.model.layers[0].self_attn, q, k, k, None,
                                    **{name: torch.zeros(1, 4, 10, 10)})


@pytest.mark.parametrize("arguments, error", [
    (dict(name="sdpa", pattern=sa.Dense()), ValueError),
    (dict(name="", pattern=sa.Dense()), TypeError),
    (dict(pattern="local"), TypeError),
    (dict(pattern=sa.Dense(), ignore_dropout=1), TypeError),
])
def test_register_checks_its_arguments(arguments, error):
    with pytest.raises(error):
        register(**arguments)


def test_older_or_missing_transformers_is_a_clear_import_error(monkeypatch):
    from sparse_attention.integrations.transformers.version import check_version

    # What `import transformers` finds now: transformers replaces its module in sys.modules
    # when names are first imported from it.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match="transformers>=5.24, found 4.57.1"):
        check_version()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'sparse_attention\[transformers\]'"):
        check_version()


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("padding", ["none", "right"])
def test_models_compile_fullgraph_on_the_op(family, padding):
    """No graph break: the mask function reads no tensor data (padding goes to the op as a
    mask even when nothing is padded)."""
    model = build(family, SPARSE).eval()
    ids, mask = inputs(padding=padding)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_close(compiled(ids, attention_mask=mask).logits, expected, 1e-5)
