"""Score terms (sinks, ALiBi, softcap, T5 position bias, dropout) in the CPU kernels against the
dense fp64 reference: each term and every pair, forward and backward (the terms' own
gradients too), every dtype, GQA, Nq != Nk, empty rows, packed documents; dropout's bits,
statistics and determinism; decoding with the terms equals the full pass; bad values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sparse_attention as sa
from sparse_attention import attention, reference, score_terms
from sparse_attention.window import Window
from conftest import FLOOR, Case, assert_rule, make_inputs, max_error, require_module

TERMS = ("sinks", "alibi_slopes", "softcap", "position_bias", "dropout")


def term_args(names, heads: int, batch: int = 1, seed: int = 0, requires_grad: bool = True) -> dict:
    """Random values of the named terms (float32 tensors, as a model's parameters would be)."""
    g = torch.Generator().manual_seed(1000 + seed)
    args = {}
    if "sinks" in names:
        args["sinks"] = torch.randn(heads, generator=g) * 2
    if "alibi_slopes" in names:
        shape = (batch, heads) if seed % 2 else (heads,)
        args["alibi_slopes"] = torch.rand(shape, generator=g) * 0.3
    if "position_bias" in names:
        args["position_bias"] = torch.randn(heads, 16, generator=g)
    for name in list(args):
        args[name].requires_grad_(requires_grad)
    if "softcap" in names:
        args["softcap"] = 2.5
    if "dropout" in names:
        args["dropout_p"] = 0.25
        args["seed"] = 12345 + seed
    return args


def check_terms(q, k, v, layout, kwargs: dict, terms: dict, *, lse_grad: bool = True):
    """out, lse and the gradients of q, k, v and of every tensor term against the fp64
    reference, under the suite's accuracy rule (twice the error of the same computation in the
    inputs' precision, plus a floor); lse's gradient enters through the loss."""
    both = {**kwargs, **terms}
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **both)
    exact, exact_lse = reference.attention(q, k, v, layout, return_lse=True, **both)
    low, low_lse = reference.attention(q, k, v, layout, return_lse=True, compute_dtype=q.dtype, **both)
    assert out.dtype == q.dtype
    assert_rule("out", out, low, exact)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse))
    seen = torch.isfinite(exact_lse)
    lse_tol = 1e-9 if q.dtype == torch.float64 else 2e-4 * (1 + exact_lse[seen].abs().max().item())
    assert max_error(lse[seen], exact_lse[seen]) <= lse_tol

    inputs = (q, k, v) + tuple(t for t in terms.values() if isinstance(t, torch.Tensor))
    names = ("dq", "dk", "dv") + tuple(n for n, t in terms.items() if isinstance(t, torch.Tensor))
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    grad_lse = torch.randn(lse.shape, generator=g).to(lse.dtype) if lse_grad else torch.zeros(lse.shape, dtype=lse.dtype)

    def loss(o, l):
        return (o.double() * grad_out.double()).sum() + (torch.where(seen, l, 0).double() * grad_lse.double()).sum()

    ours = torch.autograd.grad(loss(out, lse), inputs)
    exact_grads = torch.autograd.grad(loss(exact, exact_lse), inputs)
    low_grads = torch.autograd.grad(loss(low, low_lse), inputs)
    for name, a, b, c in zip(names, ours, low_grads, exact_grads):
        if name in ("dq", "dk", "dv"):
            assert_rule(name, a, b, c)
        else:  # sums over many scores: the rule relative to the gradient's size
            scale = 1 + c.abs().max().item()
            err, base = max_error(a, c) / scale, max_error(b, c) / scale
            assert err <= 2 * base + FLOOR[q.dtype] + 1e-6, f"{name}: {err:.3g} (baseline {base:.3g})"


def make_case(dtype, seed: int, **changes) -> Case:
    base = dict(batch=2, heads=4, kv_heads=2, q_len=90, k_len=90, head_dim=16, block_size=32,
                density=0.6, per_head=True, dtype=dtype, seed=seed)
    return Case(**{**base, **changes})


def combinations():
    singles = [(name,) for name in TERMS]
    pairs = list(itertools.combinations(TERMS, 2))
    return singles + pairs + [TERMS]


@pytest.mark.parametrize("names", combinations(), ids="+".join)
@pytest.mark.parametrize("causal", [False, True])
def test_terms_and_pairs_fp32(names, causal):
    seed = len(names) * 7 + TERMS.index(names[0]) + causal
    case = make_case(torch.float32, seed, padding=not causal)
    q, k, v, layout, pad = make_inputs(case)
    check_terms(q, k, v, layout, dict(causal=causal, key_padding_mask=pad),
                term_args(names, case.heads, case.batch, seed))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("names", [(name,) for name in TERMS] + [TERMS], ids="+".join)
def test_terms_every_dtype(names, dtype):
    case = make_case(dtype, 3, q_len=70, k_len=100)
    q, k, v, layout, _ = make_inputs(case)
    check_terms(q, k, v, layout, dict(causal=True), term_args(names, case.heads, case.batch, 3))


@pytest.mark.parametrize("q_len,k_len", [(1, 100), (7, 100), (100, 40)])
def test_terms_with_query_and_key_lengths_apart(q_len, k_len):
    """Positions align bottom-right, as the causal rule does: decode steps, chunks, Nq > Nk."""
    case = make_case(torch.float32, 5, q_len=q_len, k_len=k_len, density=0.8)
    q, k, v, layout, _ = make_inputs(case)
    for causal in (False, True):
        check_terms(q, k, v, layout, dict(causal=causal), term_args(TERMS, case.heads, case.batch, 5))


def test_empty_rows_with_sinks_give_zero_and_the_sink():
    """A row that sees no key returns 0 and lse = its sink (the whole denominator), and the
    sink's gradient takes that row's lse gradient."""
    case = make_case(torch.float32, 6, q_len=64, k_len=64, block_size=16, per_head=False)
    q, k, v, _, _ = make_inputs(case)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, 1] = False  # query block 1 sees nothing
    layout = sa.BlockLayout(mask, 16)
    terms = term_args(("sinks", "alibi_slopes", "dropout"), case.heads, case.batch, 6)
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **terms)
    assert (out[:, :, 16:32] == 0).all()
    assert torch.equal(lse[:, :, 16:32], terms["sinks"].detach().view(1, -1, 1).expand(2, -1, 16))
    check_terms(q, k, v, layout, {}, terms)


def test_window_and_tails():
    case = make_case(torch.float32, 8, q_len=77, k_len=93, block_size=16, density=1.0)
    q, k, v, layout, _ = make_inputs(case)
    check_terms(q, k, v, layout, dict(window=(20, 5)), term_args(TERMS, case.heads, case.batch, 8))


def test_packed_documents():
    """Every document alone, with its own positions; dropout keyed by the row's token index."""
    g = torch.Generator().manual_seed(9)
    heads, kv_heads, dim = 4, 2, 16
    cu = torch.tensor([0, 40, 40, 113, 150, 200])  # an empty document too
    cu_k = torch.tensor([0, 56, 66, 139, 139, 189])  # one document without keys
    q = torch.randn(1, heads, 200, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, 189, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, 189, dim, generator=g, requires_grad=True)
    layout = sa.Local(64, block_size=16)
    for causal in (False, True):
        check_terms(q, k, v, layout, dict(cu_seqlens=cu, cu_seqlens_k=cu_k, causal=causal),
                    term_args(TERMS, heads, 1, 9))


def test_packed_documents_one_call_each(monkeypatch):
    """CUDA runs packed documents with score terms but dropout one call each (on the gathered
    path, attention._terms_per_document): made to here, the result is the reference's and the
    packed kernels'."""
    g = torch.Generator().manual_seed(10)
    cu = torch.tensor([0, 40, 40, 113, 150, 200])
    cu_k = torch.tensor([0, 56, 66, 139, 139, 189])
    q = torch.randn(1, 4, 200, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 189, 16, generator=g, requires_grad=True) for _ in range(2))
    names = tuple(name for name in TERMS if name != "dropout")
    terms = term_args(names, 4, 1, 13)
    call = dict(cu_seqlens=cu, cu_seqlens_k=cu_k, causal=True)
    packed = sa.sparse_attention(q, k, v, sa.Local(64, block_size=16), **call, **terms)
    softcap, dropout = (score_terms.resolve(q, **args) for args in (dict(softcap=2.0), dict(dropout_p=0.1)))
    assert attention._terms_per_document(torch.device("cuda"), softcap)
    assert not attention._terms_per_document(torch.device("cuda"), dropout)
    assert not attention._terms_per_document(torch.device("cpu"), softcap)
    calls = []
    per_document = attention._attention_per_document
    monkeypatch.setattr(attention, "_terms_per_document", lambda device, terms: not terms.dropout_p)
    monkeypatch.setattr(attention, "_attention_per_document",
                        lambda *args, **kwargs: calls.append(1) or per_document(*args, **kwargs))
    check_terms(q, k, v, sa.Local(64, block_size=16), call, terms)
    one_each = sa.sparse_attention(q, k, v, sa.Local(64, block_size=16), **call, **terms)
    torch.testing.assert_close(one_each, packed, atol=1e-5, rtol=1e-5)
    assert calls


def test_tensor_layout_per_batch():
    case = make_case(torch.float32, 10, block_size=16)
    q, k, v, _, _ = make_inputs(case)
    mask = torch.rand(case.batch, case.kv_heads, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.6
    check_terms(q, k, v, sa.TensorLayout(mask, 16), dict(causal=True), term_args(TERMS, case.heads, case.batch, 11))


def test_gradcheck_fp64_all_terms():
    case = Case(batch=2, heads=2, kv_heads=1, q_len=20, k_len=36, head_dim=8, block_size=16,
                density=0.8, dtype=torch.float64, seed=12)
    q, k, v, layout, _ = make_inputs(case)
    g = torch.Generator().manual_seed(4)
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, sinks, slopes, table):
        out, lse = sa.sparse_attention(q, k, v, layout, causal=True, return_lse=True, sinks=sinks,
                                       alibi_slopes=slopes, position_bias=table, softcap=3.0,
                                       dropout_p=0.2, seed=99)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, sinks, slopes, table))


# --- dropout


def dropout_probe(p: float, seed: int, q_len=64, k_len=128, heads=3, batch=2, block_size=32, **call):
    """The kernels' dropout pattern read off their output: with q = 0 every visible key gets
    the same probability, and v = I makes out[..., i, j] = P_ij * keep_ij / (1 - p)."""
    q = torch.zeros(batch, heads, q_len, k_len, dtype=torch.float64)
    v = torch.eye(k_len, dtype=torch.float64).expand(batch, 1, k_len, k_len)
    k = torch.randn(batch, 1, k_len, k_len, dtype=torch.float64)
    out = sa.sparse_attention(q, k, v, sa.Dense(block_size=block_size), dropout_p=p, seed=seed, **call)
    return out != 0


@pytest.mark.parametrize("p,block_size,q_len", [(0.1, 32, 64), (0.5, 64, 200), (0.9, 128, 256), (0.3, 16, 100)])
def test_dropout_bits_are_the_reference_bits_and_keep_at_rate(p, block_size, q_len):
    """Whole 64-query groups (vectorised) and group edges (element by element) alike."""
    kept = dropout_probe(p, seed=2024, q_len=q_len, block_size=block_size)
    expected = score_terms.dropout_keep(2024, p, 2, 3, torch.arange(q_len), torch.arange(128))
    assert torch.equal(kept, expected)
    n = kept.numel()
    bound = 5 * math.sqrt(n * p * (1 - p))  # five standard deviations of the binomial count
    assert abs(kept.sum().item() - n * (1 - p)) <= bound


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_gradients_on_whole_query_groups(block_size, dtype):
    """Blocks of 64 queries or more take dropout's vector path in both passes."""
    case = make_case(dtype, 23, q_len=200, k_len=256, block_size=block_size, density=0.7)
    q, k, v, layout, _ = make_inputs(case)
    check_terms(q, k, v, layout, dict(causal=True), term_args(("dropout", "sinks"), case.heads, case.batch, 23))


def test_dropout_bits_have_no_structure_across_runs_lanes_heads_or_batch():
    kept = dropout_probe(0.5, seed=7, q_len=128).float()
    # One Philox block feeds 64 queries: 8 lanes x (4 words x 2 halves) runs of 8.
    for lane in range(8):
        assert abs(kept[:, :, lane::8].mean().item() - 0.5) < 0.03
    for run in range(8):
        rows = torch.arange(128).view(2, 8, 8)[:, run].flatten()
        assert abs(kept[:, :, rows].mean().item() - 0.5) < 0.03
    assert (kept[:, 0] != kept[:, 1]).float().mean() > 0.4
    assert (kept[0] != kept[1]).float().mean() > 0.4
    assert (kept[:, :, :, 0] != kept[:, :, :, 1]).float().mean() > 0.4


def test_dropout_philox_known_answers():
    """Random123's known-answer vectors of Philox4x32-10."""
    def words(counter, seed):
        return [int(w) for w in score_terms.philox(*(torch.tensor([c]) for c in counter), seed)]

    assert words((0, 0, 0, 0), 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_dropout_same_seed_same_result_on_any_thread_count():
    case = make_case(torch.float32, 13, q_len=200, k_len=200)
    q, k, v, layout, _ = make_inputs(case)
    terms = term_args(TERMS, case.heads, case.batch, 13)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out = sa.sparse_attention(q, k, v, layout, causal=True, **terms)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, terms["sinks"]))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    different = sa.sparse_attention(q, k, v, layout, causal=True, **{**terms, "seed": 1})
    assert not torch.equal(different, results[0][0])


def test_dropout_seed_from_torch_generator():
    case = make_case(torch.float32, 14)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    torch.manual_seed(5)
    first = sa.sparse_attention(q, k, v, layout, dropout_p=0.5)
    torch.manual_seed(5)
    again = sa.sparse_attention(q, k, v, layout, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, sa.sparse_attention(q, k, v, layout, dropout_p=0.5))
    gen = torch.Generator().manual_seed(3)
    a = sa.sparse_attention(q, k, v, layout, dropout_p=0.5, seed=gen)
    gen.manual_seed(3)
    assert torch.equal(a, sa.sparse_attention(q, k, v, layout, dropout_p=0.5, seed=gen))


# --- decoding and chunked prefill


def test_decoding_and_chunks_equal_the_full_pass():
    """Causal calls over the last rows (a decode step, a prefill chunk through a pattern) give
    the full pass's rows: the terms depend on aligned positions only."""
    g = torch.Generator().manual_seed(15)
    heads, n, dim = 4, 150, 16
    q = torch.randn(1, heads, n, dim, generator=g)
    k = torch.randn(1, 2, n, dim, generator=g)
    v = torch.randn(1, 2, n, dim, generator=g)
    terms = term_args(("sinks", "alibi_slopes", "softcap", "position_bias"), heads, 1, 15, requires_grad=False)
    pattern = sa.Local(64, block_size=16)
    full, full_lse = sa.sparse_attention(q, k, v, pattern, causal=True, return_lse=True, **terms)
    for start, end in ((149, 150), (100, 150), (37, 90)):
        out, lse = sa.sparse_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], pattern,
                                       causal=True, return_lse=True, **terms)
        assert max_error(out, full[:, :, start:end]) < 1e-5
        assert max_error(lse, full_lse[:, :, start:end]) < 1e-5


# --- the bucket rule and errors


def test_position_buckets_are_t5s():
    t5 = require_module("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)
    for bidirectional in (True, False):
        ours = score_terms.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                         max_distance=128)
        assert torch.equal(ours, theirs)


def test_position_bias_rule_object_and_default():
    case = make_case(torch.float32, 16)
    q, k, v, layout, _ = make_inputs(case)
    table = torch.randn(case.heads, 12)
    plain = sa.sparse_attention(q, k, v, layout, causal=True, position_bias=table)
    unidirectional = sa.PositionBias(table, bidirectional=False, max_distance=128)
    assert torch.equal(plain, sa.sparse_attention(q, k, v, layout, causal=True, position_bias=unidirectional))
    short = sa.PositionBias(table, bidirectional=True, max_distance=20)
    check_terms(q, k, v, layout, {}, {"position_bias": short})


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=0.1, seed="x"), TypeError, "seed"),
    (dict(sinks=torch.zeros(5)), ValueError, "sinks"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks"),
    (dict(alibi_slopes=torch.zeros(3, 4)), ValueError, "alibi_slopes"),
    (dict(position_bias=torch.zeros(4)), TypeError, "position_bias"),
    (dict(position_bias=torch.zeros(3, 8)), ValueError, "position_bias"),
])
def test_bad_terms_get_named_errors(kwargs, error, match):
    case = make_case(torch.float32, 17)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    with pytest.raises(error, match=match):
        sa.sparse_attention(q, k, v, layout, **kwargs)


def test_the_op_checks_its_term_arguments():
    """The op is callable directly: it checks what the Python layer would."""
    case = make_case(torch.float32, 18, batch=1)
    q, k, v, layout, _ = make_inputs(case, requires_grad=False)
    lists = layout.block_lists(case.q_len, case.k_len, Window(), q.device)
    from sparse_attention import ops

    def call(**terms):
        return torch.ops.sparse_attention.forward(q, k, v, *lists, None, None, None, 32, 0.25, -1, -1,
                                                  **terms)

    with pytest.raises(ValueError, match="position_buckets"):
        call(position_bias=torch.zeros(4, 8), position_buckets=torch.full((179,), 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="position_buckets"):
        call(position_bias=torch.zeros(4, 8), position_buckets=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="both"):
        call(position_bias=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout_p=1.5)
    assert ops.forward(q, k, v, lists, key_padding_mask=None, block_size=32, scale=0.25)[0].shape == q.shape


def test_supported_lists_the_terms():
    assert sa.supported("cpu", torch.float32, 64, 64, terms=TERMS) == []
    with pytest.raises(ValueError, match="terms"):
        sa.supported("cpu", torch.float32, 64, 64, terms=("bias",))
    if sa.built_with_cuda():
        reasons = sa.supported("cuda", torch.bfloat16, 64, 64, capability=(9, 0), terms=("sinks",))
        assert reasons and reasons[0].startswith("sinks")


def test_opcheck_with_terms():
    case = make_case(torch.float32, 19, batch=1, q_len=50, k_len=70)
    q, k, v, layout, _ = make_inputs(case)
    lists = layout.block_lists(case.q_len, case.k_len, Window(), q.device)
    terms = score_terms.resolve(q, **term_args(TERMS, case.heads, 1, 19)).op_args(50, 70, q.device)
    torch.library.opcheck(torch.ops.sparse_attention.forward.default,
                          (q, k, v, *lists, None, None, None, 32, 0.25, -1, -1), terms)


def test_compile_fullgraph_draws_the_seed_as_eager_does():
    torch._dynamo.reset()
    case = make_case(torch.float32, 21)
    q, k, v, layout, _ = make_inputs(case)

    def f(q):
        return sa.sparse_attention(q, k, v, layout, dropout_p=0.3)

    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(4)
    out = compiled(q)
    torch.manual_seed(4)
    assert torch.equal(out, f(q))
    assert torch.isfinite(torch.autograd.grad(out.sum(), q)[0]).all()


def test_compile_fullgraph_with_terms():
    torch._dynamo.reset()
    case = make_case(torch.float32, 20)
    q, k, v, layout, _ = make_inputs(case)
    terms = term_args(TERMS, case.heads, case.batch, 20)

    def f(q, k, v):
        return sa.sparse_attention(q, k, v, layout, causal=True, **terms)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    assert max_error(out, f(q, k, v)) < 1e-6
    grads = torch.autograd.grad(out.sum(), (q, terms["sinks"], terms["position_bias"]))
    eager = torch.autograd.grad(f(q, k, v).sum(), (q, terms["sinks"], terms["position_bias"]))
    for a, b in zip(grads, eager):
        assert max_error(a, b) < 1e-5


def test_the_dense_route_for_kernels_without_terms():
    """What a CUDA call with terms runs (sparse_attention.attention._dense_terms), here on the
    CPU: the reference in float32, with a warning once per set of terms."""
    from sparse_attention import attention

    case = make_case(torch.float32, 22)
    q, k, v, _, _ = make_inputs(case, requires_grad=False)
    terms = score_terms.resolve(q, **term_args(("sinks", "softcap"), case.heads, case.batch, 22))
    pattern = sa.Local(64, block_size=32)
    attention._DENSE_TERMS_WARNED.discard(terms.names())
    with pytest.warns(UserWarning, match="sinks, softcap: the CUDA kernels"):
        out = attention._dense_terms(q, k, v, pattern, terms, return_lse=False, causal=True,
                                     scale=0.25, window=(None, 0))
    expected = sa.sparse_attention(q, k, v, pattern, causal=True, scale=0.25, sinks=terms.sinks, softcap=terms.softcap)
    assert max_error(out, expected) < 1e-5
