"""sa.select_blocks: content-based block selection, against a plain-loop fp64 reference.

top_k and threshold, mean and max pooling, sinks and local blocks, causal (a row's choice
never depends on later keys, nor does the attention through it), heads per kv head, per
query head and shared, tails, Nq != Nk; attention through the selected layout equals the
reference with gradients; no host sync; one compile for new inputs; argument errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import sparse_attention as sa

from conftest import host_syncs
from sparse_attention import reference

B, H, HKV, D, BS = 2, 4, 2, 16, 16


def qkv(q_len=100, k_len=100, seed=0, dtype=torch.float64, heads=H, kv_heads=HKV):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return rand(B, heads, q_len, D), rand(B, kv_heads, k_len, D), rand(B, kv_heads, k_len, D)


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    return x.mean(0) if pool == "mean" else x.max(0).values


def reference_select(q, k, block_size, *, top_k=None, threshold=None, pool="mean",
                     causal=False, sink_blocks=1, local_blocks=1, heads="kv"):
    """select_blocks as the docstring states it, one row at a time with Python loops."""
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    qb, kb = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    layout_heads = {"kv": kv_heads, "q": num_heads, "shared": 1}[heads]
    out = torch.zeros(batch, layout_heads, qb, kb, dtype=torch.bool)
    for b in range(batch):
        for r in range(qb):
            q_lo, q_hi = r * block_size, min((r + 1) * block_size, q_len) - 1
            position = q_hi + k_len - q_len
            diagonal = position // block_size
            candidates = [c for c in range(kb) if not causal or c * block_size <= position]
            mass = torch.zeros(num_heads, kb, dtype=torch.float64)
            for h in range(num_heads):
                pooled_q = _pool(q[b, h, q_lo:q_hi + 1].double(), pool)
                scores = {}
                for c in candidates:
                    k_lo, k_hi = c * block_size, min((c + 1) * block_size, k_len) - 1
                    if causal:
                        k_hi = min(k_hi, position)
                    pooled_k = _pool(k[b, h // group, k_lo:k_hi + 1].double(), pool)
                    scores[c] = float(pooled_q @ pooled_k) / math.sqrt(head_dim)
                if scores:
                    top = max(scores.values())
                    total = sum(math.exp(s - top) for s in scores.values())
                    for c, s in scores.items():
                        mass[h, c] = math.exp(s - top) / total
            for lh in range(layout_heads):
                members = {"kv": range(lh * group, (lh + 1) * group), "q": [lh],
                           "shared": range(num_heads)}[heads]
                row = [sum(float(mass[h, c]) for h in members) / len(members) for c in range(kb)]
                forced = [c for c in candidates
                          if c < sink_blocks or diagonal - local_blocks < c <= diagonal]
                others = sorted((c for c in candidates if c not in forced), key=lambda c: -row[c])
                keep = list(forced)
                if top_k is not None:
                    keep += others[:top_k]
                else:
                    kept_mass = sum(row[c] for c in forced)
                    for c in others:
                        if kept_mass >= threshold:
                            break
                        keep.append(c)
                        kept_mass += row[c]
                out[b, lh, r, keep] = True
    return out


def check_selection(q, k, **kwargs):
    layout = sa.select_blocks(q, k, BS, **kwargs)
    want = reference_select(q, k, BS, **kwargs)
    assert isinstance(layout, sa.TensorLayout) and layout.block_size == BS
    assert layout.mask.dtype == torch.bool and layout.mask.shape == want.shape
    assert torch.equal(layout.mask, want), (layout.mask ^ want).nonzero()
    return layout


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("rule", [dict(top_k=2), dict(top_k=0), dict(threshold=0.6),
                                  dict(threshold=0.95)])
def test_top_k_and_threshold_match_the_reference(rule, pool, causal):
    q, k, _ = qkv(q_len=100, k_len=100, seed=1)
    check_selection(q, k, pool=pool, causal=causal, **rule)


@pytest.mark.parametrize("heads", ["kv", "q", "shared"])
@pytest.mark.parametrize("causal", [False, True])
def test_heads_per_kv_head_query_head_and_shared(heads, causal):
    q, k, _ = qkv(q_len=90, k_len=120, seed=2)
    layout = check_selection(q, k, top_k=3, heads=heads, causal=causal)
    assert layout.num_heads == {"kv": HKV, "q": H, "shared": 1}[heads]
    assert layout.mask.shape[0] == B
    check_selection(q, k, threshold=0.7, heads=heads, causal=causal, pool="max")


@pytest.mark.parametrize("sink_blocks, local_blocks", [(0, 0), (1, 1), (2, 3), (0, 2), (9, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_and_local_blocks_are_always_kept(sink_blocks, local_blocks, causal):
    q, k, _ = qkv(q_len=110, k_len=140, seed=3)
    layout = check_selection(q, k, top_k=1, sink_blocks=sink_blocks, local_blocks=local_blocks,
                             causal=causal)
    qb, kb = layout.mask.shape[2:]
    for r in range(qb):
        diagonal = (min((r + 1) * BS, 110) - 1 + 30) // BS
        for c in list(range(min(sink_blocks, diagonal + 1 if causal else kb))) + \
                list(range(max(0, diagonal - local_blocks + 1), diagonal + 1)):
            assert layout.mask[:, :, r, c].all()


@pytest.mark.parametrize("q_len, k_len", [(100, 100), (37, 150), (150, 37), (16, 160),
                                          (160, 16), (1, 70), (70, 1), (33, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_tails_and_unequal_lengths(q_len, k_len, causal):
    q, k, _ = qkv(q_len=q_len, k_len=k_len, seed=q_len + k_len)
    check_selection(q, k, top_k=2, causal=causal)
    check_selection(q, k, threshold=0.8, causal=causal, pool="max", heads="q")
    # Without local blocks the diagonal block competes (pooled up to the row's last query).
    check_selection(q, k, top_k=1, causal=causal, local_blocks=0, sink_blocks=0)
    check_selection(q, k, threshold=0.5, causal=causal, local_blocks=0, heads="shared")


def test_rows_before_the_first_key_are_empty_under_causal():
    q, k, _ = qkv(q_len=100, k_len=20, seed=4)
    layout = check_selection(q, k, top_k=5, causal=True, sink_blocks=2)
    # Query blocks 0..4 (queries < 80) come before key position 0: no candidate.
    assert not layout.mask[:, :, :5].any()
    assert layout.mask[:, :, 5:, 0].all()


def test_top_k_larger_than_the_candidates_keeps_them_all():
    q, k, _ = qkv(q_len=100, k_len=100, seed=5)
    dense = sa.select_blocks(q, k, BS, top_k=100)
    assert dense.mask.all()
    causal = sa.select_blocks(q, k, BS, top_k=100, causal=True)
    want = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(causal.mask, want.expand_as(causal.mask))
    assert sa.select_blocks(q, k, BS, threshold=1.0, causal=True).mask.sum() <= causal.mask.sum()


def test_a_row_never_depends_on_later_keys_under_causal():
    q, k, v = qkv(q_len=100, k_len=130, seed=6)
    # Each row's last query position (45, 61, ...: inside a key block), and others.
    for cut in [min((r + 1) * BS, 100) - 1 + 30 for r in range(7)] + [40, 47, 64]:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, cut + 1:] = torch.randn_like(k2[:, :, cut + 1:]) * 5
        v2[:, :, cut + 1:] = torch.randn_like(v2[:, :, cut + 1:])
        # Rows whose last query sits at or before key position `cut`.
        rows = [r for r in range(7) if min((r + 1) * BS, 100) - 1 + 30 <= cut]
        for kwargs in (dict(top_k=1), dict(threshold=0.5, pool="max"), dict(top_k=2, heads="q")):
            first = sa.select_blocks(q, k, BS, causal=True, local_blocks=0, sink_blocks=0, **kwargs)
            second = sa.select_blocks(q, k2, BS, causal=True, local_blocks=0, sink_blocks=0, **kwargs)
            assert torch.equal(first.mask[:, :, rows], second.mask[:, :, rows])
            out = sa.sparse_attention(q, k, v, first, causal=True)
            out2 = sa.sparse_attention(q, k2, v2, second, causal=True)
            queries = (rows[-1] + 1) * BS if rows else 0
            assert torch.equal(out[:, :, :queries], out2[:, :, :queries])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", ["kv", "q", "shared"])
def test_attention_through_the_selection_matches_the_reference(causal, heads):
    q, k, v = (t.requires_grad_() for t in qkv(q_len=90, k_len=130, seed=7))
    layout = sa.select_blocks(q, k, BS, top_k=2, causal=causal, heads=heads)
    assert not layout.mask.requires_grad
    out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, return_lse=True)
    want, want_lse = reference.attention(q, k, v, layout, causal=causal, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    seen = want_lse > float("-inf")
    torch.testing.assert_close(lse[seen], want_lse[seen], atol=1e-10, rtol=0)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs(dtype):
    q, k, v = qkv(q_len=100, k_len=100, seed=8, dtype=dtype)
    layout = sa.select_blocks(q, k, BS, top_k=2, causal=True)
    assert layout.mask.shape == (B, HKV, 7, 7)
    out = sa.sparse_attention(q, k, v, layout, causal=True)
    want = reference.attention(q, k, v, layout, causal=True)
    torch.testing.assert_close(out, want, atol=2e-2 if dtype == torch.bfloat16 else 2e-5, rtol=0)


def test_selection_never_syncs_with_the_host(monkeypatch):
    q, k, _ = qkv(seed=9)
    with host_syncs(monkeypatch) as calls:
        for kwargs in (dict(top_k=2), dict(threshold=0.9, pool="max")):
            sa.select_blocks(q, k, BS, causal=True, heads="q", **kwargs)
    assert calls == []


def test_compiled_selection_and_attention_compile_once():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def attend(q, k, v):
        layout = sa.select_blocks(q, k, BS, threshold=0.8, causal=True)
        return sa.sparse_attention(q, k, v, layout, causal=True), layout.mask

    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    masks = []
    for seed in range(3):
        q, k, v = qkv(q_len=100, k_len=120, seed=20 + seed)
        out, mask = compiled(q, k, v)
        want_out, want_mask = attend(q, k, v)
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(out, want_out, atol=1e-10, rtol=0)
        masks.append(mask)
    assert counter.frame_count == 1
    assert not torch.equal(masks[0], masks[1])  # new inputs, new layouts, one graph


def test_bad_arguments_name_the_argument():
    q, k, _ = qkv(seed=10)
    cases = [
        (dict(), ValueError, "top_k, threshold"),
        (dict(top_k=2, threshold=0.5), ValueError, "top_k, threshold"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(threshold="0.5"), TypeError, "threshold"),
        (dict(top_k=1, pool="sum"), ValueError, "pool"),
        (dict(top_k=1, heads="all"), ValueError, "heads"),
        (dict(top_k=1, causal=1), TypeError, "causal"),
        (dict(top_k=1, sink_blocks=-1), ValueError, "sink_blocks"),
        (dict(top_k=1, local_blocks=1.5), TypeError, "local_blocks"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            sa.select_blocks(q, k, BS, **kwargs)
    with pytest.raises(ValueError, match="block_size"):
        sa.select_blocks(q, k, 24, top_k=1)
    with pytest.raises(TypeError, match="block_size"):
        sa.select_blocks(q, k, 16.0, top_k=1)
    with pytest.raises(TypeError, match="^q"):
        sa.select_blocks(q.long(), k, BS, top_k=1)
    with pytest.raises(TypeError, match="^k"):
        sa.select_blocks(q, "k", BS, top_k=1)
    with pytest.raises(ValueError, match="^q"):
        sa.select_blocks(q[0], k, BS, top_k=1)
    with pytest.raises(ValueError, match="kv heads"):
        sa.select_blocks(q[:, :3], k, BS, top_k=1)
    with pytest.raises(ValueError, match="head_dim"):
        sa.select_blocks(q, k[..., :8], BS, top_k=1)
    with pytest.raises(ValueError, match="batch"):
        sa.select_blocks(q, k[:1], BS, top_k=1)
