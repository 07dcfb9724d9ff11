"""sparse_attention.nn: SparseMultiheadAttention against torch.nn.MultiheadAttention and the
reference, SparseSelfAttention against the reference with DeepSpeed's mask conventions, the
dispatch between the kernels and SDPA, and the errors."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention import kernel_table, reference, support
from sparse_attention.nn import AttentionDispatch, SparseMultiheadAttention, SparseSelfAttention

E, H, N, BS = 64, 4, 200, 32  # N is not a multiple of the block size


def random_inputs(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def padding(batch=2, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(batch, n, generator=g) < 0.2
    pad[1, n // 2:] = True  # whole padded blocks
    return pad


def grads(out, tensors):
    return torch.autograd.grad(out, tensors, torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))


def assert_close_with_grads(ours, theirs, inputs, atol, their_inputs=None):
    """Outputs and gradients agree; their_inputs: theirs's leaves matching inputs (default the same)."""
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    for a, b in zip(grads(ours, inputs), grads(theirs, their_inputs or inputs)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- Dense pattern: the same as nn.MultiheadAttention -----------------------------------------

CAUSAL_BOOL = torch.ones(N, N, dtype=torch.bool).triu(1)
CAUSAL_FLOAT = torch.nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64)


@pytest.mark.parametrize("sdpa_max_len", [0, 1000])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "float_padding", "causal_bool", "causal_float",
                                   "is_causal_padding"])
def test_dense_pattern_matches_nn_multihead_attention(masks, batch_first, sdpa_max_len):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    ours = SparseMultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64,
                                    pattern=sa.Dense(block_size=BS), sdpa_max_len=sdpa_max_len)
    ours.load_state_dict(theirs.state_dict())
    x = random_inputs(*((2, N, E) if batch_first else (N, 2, E)))
    pad = padding()
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": pad},
        "float_padding": {"key_padding_mask": torch.zeros(2, N, dtype=torch.float64).masked_fill(pad, float("-inf"))},
        "causal_bool": {"attn_mask": CAUSAL_BOOL},
        "causal_float": {"attn_mask": CAUSAL_FLOAT},
        "is_causal_padding": {"attn_mask": CAUSAL_BOOL, "is_causal": True, "key_padding_mask": pad},
    }[masks]
    out, weights = ours(x, x, x, **kwargs)
    # A dense layout is SDPA's job, unless SDPA would need a mask for it (causal and padded).
    masked = masks == "is_causal_padding" and sdpa_max_len == 0
    assert weights is None and ours.attention_path == ("sparse" if masked else "sdpa")
    expected = theirs(x, x, x, need_weights=False, **kwargs)[0]
    assert_close_with_grads(out, expected, [x, *ours.parameters()], atol=1e-10,
                            their_inputs=[x, *theirs.parameters()])


def test_cross_attention_kdim_vdim_no_bias_unbatched():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, bias=False, kdim=48, vdim=40, dtype=torch.float64)
    ours = SparseMultiheadAttention(E, H, bias=False, kdim=48, vdim=40, dtype=torch.float64,
                                    pattern=sa.Dense(block_size=BS))
    ours.load_state_dict(theirs.state_dict())
    q, k, v = random_inputs(N, E), random_inputs(150, 48, seed=1), random_inputs(150, 40, seed=2)
    assert_close_with_grads(ours(q, k, v)[0], theirs(q, k, v, need_weights=False)[0], [q, k, v],
                            atol=1e-10)


def test_same_initialisation_as_nn_multihead_attention():
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(E, H)
    torch.manual_seed(3)
    ours = SparseMultiheadAttention(E, H, pattern=sa.Dense())
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


# --- Sparse patterns: the same as the reference, on both paths ---------------------------------

def multihead_reference(module, x, pattern, causal, pad):
    """The module's projections around reference.attention with the pattern's layout."""
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q, k, v = (F.linear(x, w, b).unflatten(-1, (H, E // H)).transpose(1, 2)
               for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    layout = pattern.layout(N, num_heads=H, causal=causal)
    out = reference.attention(q, k, v, layout, causal=causal, key_padding_mask=pad,
                              window=pattern.token_window)
    return module.out_proj(out.transpose(1, 2).flatten(2))


PATTERNS = {
    "fixed": lambda: sa.Fixed(64, block_size=BS),
    "strided_factorized": lambda: sa.Strided(64, block_size=BS, factorized=True),
    "local_exact": lambda: sa.Local(40, block_size=BS, exact=True),
    "empty_rows": lambda: sa.Custom(torch.eye(7, dtype=torch.bool).roll(1, 0) & (torch.arange(7) != 3)[:, None],
                                    block_size=BS),
}


@pytest.mark.parametrize("path", ["sparse", "sdpa"])
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_pattern_matches_reference(name, causal, path):
    torch.manual_seed(0)
    pattern = PATTERNS[name]()
    module = SparseMultiheadAttention(E, H, batch_first=True, dtype=torch.float64, pattern=pattern,
                                      sdpa_max_len=0 if path == "sparse" else N)
    x = random_inputs(2, N, E)
    pad = padding()
    out = module(x, x, x, key_padding_mask=pad, is_causal=causal)[0]
    assert module.attention_path == path
    expected = multihead_reference(module, x, pattern, causal, pad)
    assert_close_with_grads(out, expected, [x, *module.parameters()], atol=1e-10)


def test_dispatch_thresholds_and_log_once(caplog):
    pattern = sa.Local(64, block_size=BS)
    dispatch = AttentionDispatch(pattern, sdpa_max_len=N - 1)
    assert dispatch.choose(N, N, H, True).path == "sparse"
    assert dispatch.choose(N - 1, N - 1, H, True).path == "sdpa"
    assert AttentionDispatch(pattern, sdpa_max_len=0, sdpa_min_coverage=0.5).choose(N, N, H, True).path == "sdpa"
    dense = AttentionDispatch(sa.Dense(block_size=BS), sdpa_max_len=0)
    assert dense.choose(N, N, H, True).path == "sdpa" and dense.choose(N, N, H, False, padded=True).path == "sdpa"
    assert dense.choose(N, N, H, True, padded=True).path == "sparse"  # SDPA would need an N x N mask
    assert dense.choose(N - 1, N, H, True).path == "sparse"  # causal SDPA aligns top-left
    module = SparseMultiheadAttention(E, H, pattern=pattern, sdpa_max_len=100)
    assert module.attention_path is None
    with caplog.at_level(logging.DEBUG, logger="sparse_attention.nn"):
        for n in (N, N, 90, 80, N):
            x = torch.randn(n, 1, E)
            module(x, x, x)
    assert module.attention_path == "sparse"
    lines = [r.getMessage() for r in caplog.records if r.name == "sparse_attention.nn"]
    assert len(lines) == 2 and "sparse attention" in lines[0] and "sdpa attention" in lines[1], lines


def test_attention_dropout_on_both_paths():
    module = SparseMultiheadAttention(E, H, dropout=0.5, pattern=sa.Local(64, block_size=BS), sdpa_max_len=0)
    x = torch.randn(N, 1, E)
    module.eval()
    plain = module(x, x, x)[0]
    module.train()
    for length, path in ((N, "sparse"), (32, "sdpa")):
        module.dispatch.sdpa_max_len = 64
        y = x[:length]
        outs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            outs.append(module(y, y, y)[0])
        assert module.attention_path == path
        assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
        assert not torch.allclose(outs[0], plain[:length] if path == "sdpa" else plain)
        outs[0].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("call", ["pattern", "layout", "documents"])
def test_dispatch_passes_dropout_to_the_kernels(call):
    """The sparse path draws its seed as sparse_attention(seed=None) does."""
    pattern = sa.Local(64, block_size=BS)
    dispatch = AttentionDispatch(pattern, sdpa_max_len=0)
    q, k, v = (random_inputs(1, H, N, 16, seed=s) for s in range(3))
    extra = {"pattern": {}, "layout": {"layout": pattern.layout(N, N, num_heads=H)},
             "documents": {"cu_seqlens": torch.tensor([0, 70, N])}}[call]
    torch.manual_seed(5)
    ours = dispatch(q, k, v, causal=True, dropout_p=0.3, **extra)
    torch.manual_seed(5)
    theirs = sa.sparse_attention(q, k, v, extra.get("layout", pattern), causal=True, dropout_p=0.3,
                                 cu_seqlens=extra.get("cu_seqlens"))
    assert dispatch.last_path == "sparse"
    assert_close_with_grads(ours, theirs, (q, k, v), atol=1e-12)
    assert not torch.allclose(ours, dispatch(q, k, v, causal=True, **extra))


# --- SparseSelfAttention: DeepSpeed's interface --------------------------------------------------

@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("path", ["sparse", "sdpa"])
def test_sparse_self_attention_matches_reference(mode, path):
    config = sa.FixedSparsityConfig(num_heads=H, block=BS, num_local_blocks=2, attention="unidirectional")
    module = SparseSelfAttention(config, key_padding_mask_mode=mode, sdpa_max_len=0 if path == "sparse" else N)
    q, k, v = (random_inputs(2, H, N, 16, seed=s) for s in range(3))
    pad = padding()
    if mode == "add":
        mask = torch.zeros(2, 1, 1, N).masked_fill(pad[:, None, None], -10000.0)  # BERT's extended mask
    else:
        mask = (~pad).float()
    out = module(q, k.transpose(-1, -2), v, key_padding_mask=mask)  # keys may come transposed
    assert module.attention_path == path
    expected = reference.attention(q, k, v, config.layout(N, num_heads=H, causal=True), causal=True,
                                   key_padding_mask=pad)
    assert_close_with_grads(out, expected, [q, k, v], atol=1e-10)


def test_sparse_self_attention_causal_attn_mask():
    config = sa.BigBirdSparsityConfig(num_heads=H, block=BS, num_random_blocks=1)
    module = SparseSelfAttention(config, sdpa_max_len=0)
    q, k, v = (random_inputs(1, H, N, 16, seed=s) for s in range(3))
    out = module(q, k, v, attn_mask=torch.ones(N, N).tril())  # 'mul': 1 = keep
    expected = reference.attention(q, k, v, config.layout(N, num_heads=H, causal=True), causal=True)
    assert_close_with_grads(out, expected, [q, k, v], atol=1e-10)


# --- Errors -------------------------------------------------------------------------------------

def test_errors():
    x = torch.randn(N, 2, E)
    with pytest.raises(ValueError, match="num_heads: the config was made for 8 heads, got 4"):
        SparseMultiheadAttention(E, 4, pattern=sa.VariableSparsityConfig(num_heads=8))
    with pytest.raises(ValueError, match="num_heads: .* even number of heads"):
        SparseMultiheadAttention(48, 3, pattern=sa.Strided(64, factorized=True))
    with pytest.raises(TypeError, match="pattern: expected a sparse_attention Pattern"):
        SparseMultiheadAttention(E, H, pattern="fixed")
    with pytest.raises(ValueError, match="add_bias_kv"):
        SparseMultiheadAttention(E, H, add_bias_kv=True, pattern=sa.Dense())
    with pytest.raises(ValueError, match="dropout: expected a probability"):
        SparseMultiheadAttention(E, H, dropout=1.5, pattern=sa.Dense())
    with pytest.raises(ValueError, match="sdpa_min_coverage"):
        SparseMultiheadAttention(E, H, pattern=sa.Dense(), sdpa_min_coverage=0)
    module = SparseMultiheadAttention(E, H, pattern=sa.Local(64))
    with pytest.raises(ValueError, match="need_weights"):
        module(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask: only the causal mask"):
        module(x, x, x, attn_mask=torch.rand(N, N) < 0.5)
    with pytest.raises(ValueError, match=r"attn_mask: expected a \[200, 200\] causal mask"):
        module(x, x, x, attn_mask=torch.ones(2 * H, N, N, dtype=torch.bool).triu(1))
    with pytest.raises(ValueError, match="key_padding_mask: .* arbitrary additive biases"):
        module(x, x, x, key_padding_mask=torch.randn(2, N))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 200\)"):
        module(x, x, x, key_padding_mask=torch.zeros(2, N + 1, dtype=torch.bool))
    config = sa.FixedSparsityConfig(num_heads=H, block=BS)
    with pytest.raises(ValueError, match="key_padding_mask_mode: expected 'add' or 'mul'"):
        SparseSelfAttention(config, key_padding_mask_mode="bool")
    q = torch.randn(1, H, N, 16)
    with pytest.raises(ValueError, match="rpe: relative position embeddings are not supported"):
        SparseSelfAttention(config)(q, q, q, rpe=torch.randn(N, N))
    with pytest.raises(ValueError, match=r"key_padding_mask: .* 1 \(keep\) or 0 \(ignore\)"):
        SparseSelfAttention(config, key_padding_mask_mode="mul")(q, q, q, key_padding_mask=torch.full((1, N), 0.5))
    with pytest.raises(ValueError, match="num_heads: the config was made for 4 heads, got 2"):
        SparseSelfAttention(config)(q[:, :2], q[:, :2], q[:, :2])


def test_compile_fullgraph_multihead_attention():
    module = SparseMultiheadAttention(E, H, batch_first=True, pattern=sa.Fixed(64, block_size=BS), sdpa_max_len=0)
    x = random_inputs(2, N, E, dtype=torch.float32)
    kwargs = dict(key_padding_mask=padding(), is_causal=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # see test_models.py
    out = compiled(x, x, x, **kwargs)[0]
    assert module.attention_path == "sparse"
    assert_close_with_grads(out, module(x, x, x, **kwargs)[0], [x, *module.parameters()], atol=1e-5)


def test_inside_nn_transformer_encoder():
    """nn.TransformerEncoder deep-copies its layer, has an inference fast path, and is saved whole."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=2 * E, dropout=0.0, batch_first=True)
    layer.self_attn = SparseMultiheadAttention(E, H, batch_first=True, pattern=sa.Local(64, block_size=BS),
                                               sdpa_max_len=0)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, N, E)
    out = encoder(x, is_causal=True, mask=torch.nn.Transformer.generate_square_subsequent_mask(N))
    assert [m.self_attn.attention_path for m in encoder.layers] == ["sparse", "sparse"]
    encoder.eval()
    with torch.no_grad():  # torch's inference fast path would compute dense attention here
        torch.testing.assert_close(encoder(x), encoder.train()(x), atol=1e-6, rtol=0)
    buffer = io.BytesIO()
    torch.save(encoder, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x, is_causal=True, mask=torch.nn.Transformer.generate_square_subsequent_mask(N)),
                               out, atol=0, rtol=0)


def test_dispatch_runs_unsupported_cases_on_sdpa_with_one_warning(monkeypatch):
    # A head dim the CPU kernels are not compiled for (and, simulated, a CUDA-only limit):
    # the dispatch computes the same function on SDPA with the exact element mask.
    pattern = sa.Local(64, block_size=BS)
    dispatch = AttentionDispatch(pattern, sdpa_max_len=0, owner="layer 0")
    q = random_inputs(2, H, N, 264)
    k, v = random_inputs(2, H, N, 264, seed=1), random_inputs(2, H, N, 264, seed=2)
    with pytest.warns(UserWarning, match=r"layer 0: dense SDPA .* head_dim 264"):
        out = dispatch(q, k, v, causal=True)
    assert dispatch.last_path == "sdpa"
    layout = pattern.layout(N, causal=True)
    expected = reference.attention(q, k, v, layout, causal=True)
    assert_close_with_grads(out, expected, [q, k, v], atol=1e-10)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch(q, k, v, causal=True)  # warned once only
    assert sa.supported("cpu", torch.float32, 64, BS) == []
    monkeypatch.setattr("sparse_attention.nn.dispatch.supported",
                        lambda *args: ["block_size 32: the CUDA kernels take 64, 128"])
    with pytest.warns(UserWarning, match="the CUDA kernels take 64, 128"):
        assert AttentionDispatch(pattern, sdpa_max_len=0).choose(N, N, H, True).path == "sdpa"


def test_supported_names_each_reason(monkeypatch):
    assert sa.supported("cpu", torch.bfloat16, 64, 64) == []
    reasons = sa.supported("cpu", torch.float32, 300, 8)
    assert any("head_dim 300" in r for r in reasons) and any("block_size 8" in r for r in reasons)
    if not sa.built_with_cuda():
        assert "no CUDA kernels" in sa.supported("cuda", torch.float16, 64, 64)[0]
    # The CUDA table, as a CUDA build answers it (no GPU needed with capability=).
    monkeypatch.setattr("sparse_attention.support.built_with_cuda", lambda: True)
    assert any("dtype float32" in r for r in sa.supported("cuda", torch.float32, 64, 64,
                                                           capability=(9, 0)))
    assert sa.supported("cuda", torch.bfloat16, 128, 128, capability=(9, 0)) == []
    assert sa.supported("cuda", torch.bfloat16, 96, 64, capability=(9, 0)) == []  # padded to 128
    assert any("head_dim 136" in r for r in sa.supported("cuda", torch.bfloat16, 136, 64,
                                                         capability=(9, 0)))
    assert any("block_size 32" in r for r in sa.supported("cuda", torch.bfloat16, 64, 32,
                                                          capability=(9, 0)))
    # 99 KB: at head dim 128 the backward takes the dQ pass, whose dK/dV kernel fits, and
    # block size 128 runs as blocks of 64 (support.cuda_run_block_size).
    for capability in ((8, 6), (8, 9), (12, 0)):
        assert sa.supported("cuda", torch.bfloat16, 128, 64, capability=capability) == []
        assert sa.supported("cuda", torch.bfloat16, 128, 128, capability=capability) == []
    assert sa.supported("cuda", torch.bfloat16, 64, 256, capability=(9, 0)) == []  # as 128s
    # A GPU short of shared memory for every block size: the reasons name the kernels.
    monkeypatch.setitem(kernel_table.CUDA_SHARED_BYTES_BY_CAPABILITY, (8, 6), 64 * 1024)
    caches = (support._reasons, support._cuda_run_block_size)  # they cache the answers
    for cache in caches:
        cache.cache_clear()
    try:
        small = sa.supported("cuda", torch.bfloat16, 96, 128, capability=(8, 6))
    finally:
        for cache in caches:
            cache.cache_clear()
    assert small and all("shared memory" in r and "sm_86" in r for r in small)
    assert any("head_dim 96 (run at 128), block_size 128" in r for r in small)
    assert sa.supported("cuda", torch.bfloat16, 64, 64, capability=(8, 6)) == []
    assert any("compute capability" in r for r in sa.supported("cuda", torch.float16, 64, 64,
                                                               capability=(7, 5)))
    with pytest.raises(TypeError, match="dtype"):
        sa.supported("cpu", "int8", 64, 64)
    assert "kernels for cpu and cuda only" in sa.supported("mps", torch.float32, 64, 64)[0]


def test_the_backward_takes_the_dq_pass_where_the_atomics_do_not_fit():
    from sparse_attention import kernel_table as table

    small = table.cuda_shared_limit((8, 6))
    assert table.cuda_shared_bytes("grad_kv", 128, 64) > small
    assert table.cuda_shared_bytes("grad_kv_before_dq_pass", 128, 64) <= small
    assert table.cuda_shared_bytes("grad_kv", 128, 64) - table.cuda_shared_bytes(
        "grad_kv_before_dq_pass", 128, 64) == 64 * 64 * 2  # the dS^T staging
    assert table.cuda_backward_takes_dq_pass(128, 64, small)
    assert not table.cuda_backward_takes_dq_pass(64, 64, small)
    assert not table.cuda_backward_takes_dq_pass(128, 128, table.cuda_shared_limit((8, 0)))
    with pytest.raises(ValueError, match="kernel: expected one of forward"):
        table.cuda_shared_bytes("grad", 64, 64)


def test_generated_cuda_sources_match_the_kernel_table():
    import pathlib
    import subprocess
    import sys
    script = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "generate_instantiations.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
