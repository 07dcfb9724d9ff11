"""Decoding and chunked prefill equal the full forward pass, for every pattern name.

A causal call with Nq < Nk runs on behalf of a longer sequence: its queries are the last Nq
positions. Whatever the chunk lengths (starting inside a block, crossing block boundaries,
one token at a time), every query must see exactly the keys it sees in the full forward pass
of the whole sequence, on the op, through AttentionDispatch (kernels and SDPA), in our models
with a KVCache and in transformers models with dynamic and static caches (GQA included).
"""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention.integrations import TRANSFORMERS_MINIMUM_VERSION
from sparse_attention.nn import AttentionDispatch

from conftest import require_module

BS = 16
L = 150  # not a multiple of the block size
H, HKV, D = 4, 2, 16
# Prefill chunks that start inside blocks and cross block boundaries, then single tokens.
CHUNKS = [37, 20, 33, 1, 1, 5, 40, 1, 12]
assert sum(CHUNKS) == L


def pattern_for(name: str, seq_len: int = L):
    return sa.from_name(name, seq_len=seq_len, block_size=BS, num_heads=H)


def random_qkv(seed: int, length: int = L, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, length, D, generator=g, dtype=dtype)
    k = torch.randn(1, HKV, length, D, generator=g, dtype=dtype)
    v = torch.randn(1, HKV, length, D, generator=g, dtype=dtype)
    return q, k, v


def in_chunks(attend, q, k, v, chunks):
    """Outputs and lse of each chunk's queries against all keys up to the chunk's end."""
    outs, lses, start = [], [], 0
    for n in chunks:
        out, lse = attend(q[:, :, start:start + n], k[:, :, :start + n], v[:, :, :start + n])
        outs.append(out)
        lses.append(lse)
        start += n
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@pytest.mark.parametrize("name", sa.PATTERN_NAMES)
def test_chunked_prefill_and_decoding_equal_the_full_forward_on_the_op(name):
    pattern = pattern_for(name)
    q, k, v = random_qkv(seed=len(name))

    def attend(q, k, v):
        return sa.sparse_attention(q, k, v, pattern, causal=True, return_lse=True)

    full_out, full_lse = attend(q, k, v)
    for chunks in (CHUNKS, [1] * L, [BS - 3, BS + 5, L - 2 * BS - 2]):
        out, lse = in_chunks(attend, q, k, v, chunks)
        torch.testing.assert_close(out, full_out, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["local", "fixed", "bigbird", "longformer"])
def test_a_chunk_that_crosses_a_block_has_the_full_forward_gradients(name):
    pattern = pattern_for(name)
    q, k, v = random_qkv(seed=3)
    start, end = 21, 70  # starts inside block 1, ends inside block 4
    weights = torch.randn(1, H, end - start, D, dtype=torch.float64)

    def grads(q_rows, keys, values, full):
        q_rows, keys, values = (t.clone().requires_grad_() for t in (q_rows, keys, values))
        if full:  # the full forward, scored on the chunk's rows only
            whole = torch.cat((q[:, :, :start], q_rows, q[:, :, end:]), dim=2)
            out = sa.sparse_attention(whole, keys, values, pattern, causal=True)[:, :, start:end]
        else:
            out = sa.sparse_attention(q_rows, keys[:, :, :end], values[:, :, :end], pattern,
                                      causal=True)
        return torch.autograd.grad((out * weights).sum(), (q_rows, keys, values))

    chunk = grads(q[:, :, start:end], k, v, full=False)
    full = grads(q[:, :, start:end], k, v, full=True)
    for got, want in zip(chunk, full):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sdpa_max_len", [0, 10_000], ids=["kernels", "sdpa"])
@pytest.mark.parametrize("name", ["local", "strided", "global", "random", "longformer", "variable"])
def test_dispatch_paths_agree_with_the_full_forward_for_chunks(name, sdpa_max_len):
    pattern = pattern_for(name)
    dispatch = AttentionDispatch(pattern, sdpa_max_len=sdpa_max_len)
    q, k, v = random_qkv(seed=5)
    full = sa.sparse_attention(q, k, v, pattern, causal=True)
    out, _ = in_chunks(lambda q, k, v: (dispatch(q, k, v, causal=True), q[..., 0]),
                       q, k, v, CHUNKS)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)


def test_the_tail_block_of_a_prefix_has_the_row_it_has_in_longer_sequences():
    # A token's output must not depend on whether later tokens of its block exist.
    pattern = sa.Global(tokens=[5, 60], rows=False, block_size=BS) | sa.Local(24, block_size=BS)
    q, k, v = random_qkv(seed=7)
    full = sa.sparse_attention(q, k, v, pattern, causal=True)
    for length in (50, 51, 57, 63):
        prefix = sa.sparse_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length],
                                     pattern, causal=True)
        torch.testing.assert_close(prefix, full[:, :, :length], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sa.PATTERN_NAMES)
def test_our_language_model_decodes_like_its_full_forward(name):
    from sparse_attention.models import KVCache, SparseTransformerConfig, SparseTransformerLM

    config = SparseTransformerConfig(vocab_size=50, max_seq_len=128, d_model=32, num_layers=2,
                                     num_heads=H, block_size=BS, pattern=name, sdpa_max_len=0,
                                     dropout=0.0)
    torch.manual_seed(0)
    model = SparseTransformerLM(config).eval()
    ids = torch.randint(0, 50, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache, logits, start = KVCache(), [], 0
        for n in (37, 20, 1, 1, 29, 12):
            logits.append(model(ids[:, start:start + n], cache=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)


# --- transformers models with their own caches.

@pytest.fixture(scope="module")
def transformers():
    return require_module("transformers", minversion=TRANSFORMERS_MINIMUM_VERSION)


def tiny_llama(transformers, implementation: str):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=H, num_key_value_heads=HKV,
                                      max_position_embeddings=256, vocab_size=61)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=implementation).eval()


def decode(model, ids, cache, chunks):
    logits, start = [], 0
    with torch.no_grad():
        for n in chunks:
            position = torch.arange(start, start + n).unsqueeze(0)
            out = model(ids[:, start:start + n], cache=cache, use_cache=True,
                        position_ids=position)
            logits.append(out.logits)
            start += n
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("name", sa.PATTERN_NAMES)
def test_transformers_cached_decoding_equals_the_full_forward(transformers, name, cache_kind):
    from sparse_attention.integrations.transformers import register

    implementation = f"sparse_attention_decoding_{name}"
    register(implementation, pattern=pattern_for(name, seq_len=128))
    model = tiny_llama(transformers, implementation)
    ids = torch.randint(0, 61, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
    if cache_kind == "dynamic":
        cache = transformers.DynamicCache(config=model.config)
    else:
        cache = transformers.StaticCache(config=model.config, max_cache_len=128)
    steps = decode(model, ids, cache, [45, 30, 1, 1, 1, 20, 1, 21])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
