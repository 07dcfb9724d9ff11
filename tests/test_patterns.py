"""Patterns: each layout is the block cover of its element-level definition (checked against a
brute-force construction), causal layouts hold no future block, random draws are seeded and
the same in every process, and attention through a pattern equals the reference."""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference
from sparse_attention.bounded_cache import CACHE_SIZE

from conftest import assert_matches_reference

# (Nq, Nk): self-attention with and without a tail block, decoding, a chunk against a longer
# key sequence that starts mid-block, and more queries than keys.
LENGTHS = [(96, 96), (203, 203), (1, 150), (70, 181), (150, 90)]


def positions(q_len, k_len):
    """Absolute query positions p [Nq, 1] (aligned bottom-right) and key positions j [1, Nk]."""
    return (torch.arange(q_len) + k_len - q_len).unsqueeze(1), torch.arange(k_len).unsqueeze(0)


def block_cover(elements: torch.Tensor, block_size: int) -> torch.Tensor:
    """[H, Nq, Nk] element mask -> [H, qb, kb]: a block is set when any element in it is."""
    h, nq, nk = elements.shape
    qb, kb = math.ceil(nq / block_size), math.ceil(nk / block_size)
    padded = torch.zeros(h, qb * block_size, kb * block_size, dtype=torch.bool)
    padded[:, :nq, :nk] = elements
    return padded.view(h, qb, block_size, kb, block_size).any(dim=4).any(dim=2)


# Element-level definitions, written straight from the papers on the full [Nq, Nk] grid.
def local_elements(p, j, window):
    return (p - j).abs() < window


def dilated_elements(p, j, dilation, window):
    d = p - j
    near = torch.ones_like(d, dtype=torch.bool) if window is None else d.abs() < window
    return (d % dilation == 0) & near


def strided_elements(p, j, stride):
    return local_elements(p, j, stride) | dilated_elements(p, j, stride, None)


def fixed_elements(p, j, chunk, summary, k):
    same_chunk = torch.div(j, chunk, rounding_mode="floor") == torch.div(p, chunk, rounding_mode="floor")
    offset = j % chunk
    return same_chunk | ((offset >= chunk - (k + 1) * summary) & (offset < chunk - k * summary))


def global_elements(p, j, tokens, rows=True, columns=True):
    tokens = torch.tensor(tokens)
    out = torch.zeros(p.shape[0], j.shape[1], dtype=torch.bool)
    if columns:
        out |= torch.isin(j, tokens)
    if rows:
        out |= torch.isin(p, tokens)
    return out


# name -> (pattern, heads, definition(p, j, head)); block size 16 throughout.
BS = 16
CASES = {
    "dense": (sa.Dense(block_size=BS), 1, lambda p, j, h: torch.ones(p.shape[0], j.shape[1], dtype=torch.bool)),
    "local": (sa.Local(40, block_size=BS), 1, lambda p, j, h: local_elements(p, j, 40)),
    "local-1": (sa.Local(1, block_size=BS), 1, lambda p, j, h: local_elements(p, j, 1)),
    "local-blocks": (sa.Local(32, block_size=BS), 1, lambda p, j, h: local_elements(p, j, 32)),
    "dilated": (sa.Dilated(32, window=100, block_size=BS), 1, lambda p, j, h: dilated_elements(p, j, 32, 100)),
    "dilated-unbounded": (sa.Dilated(48, block_size=BS), 1, lambda p, j, h: dilated_elements(p, j, 48, None)),
    "strided": (sa.Strided(48, block_size=BS), 1, lambda p, j, h: strided_elements(p, j, 48)),
    "strided-factorized": (sa.Strided(32, block_size=BS, factorized=True), 4,
                           lambda p, j, h: local_elements(p, j, 32) if h % 2 == 0
                           else dilated_elements(p, j, 32, None)),
    "fixed": (sa.Fixed(64, block_size=BS), 1, lambda p, j, h: fixed_elements(p, j, 64, BS, 0)),
    "fixed-small-summary": (sa.Fixed(48, summary=5, block_size=BS), 1,
                            lambda p, j, h: fixed_elements(p, j, 48, 5, 0)),
    "fixed-per-head": (sa.Fixed(64, summary=16, num_patterns=3, block_size=BS), 6,
                       lambda p, j, h: fixed_elements(p, j, 64, 16, h % 3)),
    "global-tokens": (sa.Global(tokens=[0, 37, 80], block_size=BS), 1,
                      lambda p, j, h: global_elements(p, j, [0, 37, 80])),
    "global-columns": (sa.Global(tokens=[5, 60], rows=False, block_size=BS), 1,
                       lambda p, j, h: global_elements(p, j, [5, 60], rows=False)),
    "global-rows": (sa.Global(tokens=[20, 70], columns=False, block_size=BS), 1,
                    lambda p, j, h: global_elements(p, j, [20, 70], columns=False)),
    "global-blocks": (sa.Global(num_blocks=2, block_size=BS), 1,
                      lambda p, j, h: global_elements(p, j, list(range(2 * BS)))),
    "longformer": (sa.Longformer(24, global_tokens=[3, 50], block_size=BS), 1,
                   lambda p, j, h: local_elements(p, j, 24) | global_elements(p, j, [3, 50])),
    "bigbird-no-random": (sa.BigBird(num_window_blocks=5, num_global_blocks=1, num_random_blocks=0, block_size=BS), 1,
                          lambda p, j, h: local_elements(p, j, 2 * BS) | global_elements(p, j, list(range(BS)))),
    "union": (sa.Local(20, block_size=BS) | sa.Dilated(64, block_size=BS), 1,
              lambda p, j, h: local_elements(p, j, 20) | dilated_elements(p, j, 64, None)),
}


def expected_layout(name, q_len, k_len, causal):
    pattern, heads, definition = CASES[name]
    if not causal:
        p, j = positions(q_len, k_len)
        return block_cover(torch.stack([definition(p, j, h) for h in range(heads)]), BS)
    # Under causal: the cover of whole blocks of the sequence (every position of each block,
    # also past the end), and each query block of the call gets the union of the rows of the
    # whole blocks its queries fall in.
    k_blocks, first = math.ceil(k_len / BS), (k_len - q_len) // BS
    p = torch.arange(first * BS, k_blocks * BS).unsqueeze(1)
    j = torch.arange(k_blocks * BS).unsqueeze(0)
    whole = block_cover(torch.stack([definition(p, j, h) for h in range(heads)]) & (j <= p), BS)
    query_blocks = torch.div(torch.arange(q_len) + k_len - q_len, BS, rounding_mode="floor") - first
    rows = []
    for r in range(math.ceil(q_len / BS)):
        spanned = query_blocks[r * BS:(r + 1) * BS].unique().tolist()
        rows.append(torch.stack([whole[:, b] for b in spanned]).any(dim=0))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_is_the_block_cover_of_the_definition(name, causal):
    pattern, heads, _ = CASES[name]
    for q_len, k_len in LENGTHS:
        if name == "global-tokens" and k_len <= 80 or name == "longformer" and k_len <= 50:
            continue  # global tokens past the sequence are refused (tested below)
        layout = pattern.layout(q_len, k_len, num_heads=heads, causal=causal)
        want = expected_layout(name, q_len, k_len, causal)
        assert layout.num_heads in (1, heads)
        got = layout.mask.expand(heads, -1, -1)
        assert torch.equal(got, want), f"{name} Nq={q_len} Nk={k_len}: {(got != want).sum()} blocks differ"


def test_bigbird_is_its_deterministic_part_plus_random_blocks():
    for causal in (False, True):
        full = sa.BigBird(num_random_blocks=2, seed=3, block_size=BS).layout(203, causal=causal).mask
        fixed = sa.BigBird(num_random_blocks=0, block_size=BS).layout(203, causal=causal).mask
        random = sa.Random(2, seed=3, block_size=BS).layout(203, causal=causal).mask
        assert torch.equal(full, fixed | random)


def visible_blocks(q_len, k_len, bs):
    """Blocks holding at least one (query, key) pair with j <= p, built element by element."""
    p, j = positions(q_len, k_len)
    return block_cover((j <= p).unsqueeze(0), bs)[0]


def all_named_patterns(seq_len, block_size, num_heads):
    return {name: sa.from_name(name, seq_len=seq_len, block_size=block_size, num_heads=num_heads)
            for name in sa.PATTERN_NAMES}


@pytest.mark.parametrize("q_len,k_len", [(500, 500), (1, 777), (100, 333), (256, 1024)])
def test_causal_layouts_hold_no_future_block(q_len, k_len):
    visible = visible_blocks(q_len, k_len, 32)
    for name, pattern in all_named_patterns(k_len, 32, 2).items():
        if name == "random":
            pattern = sa.Random(30, block_size=32)  # dense draws: more chances to go wrong
        mask = pattern.layout(q_len, k_len, num_heads=2, causal=True).mask
        assert not (mask & ~visible).any(), name


def test_unidirectional_config_layout_holds_no_future_block():
    config = sa.VariableSparsityConfig(2, 16, num_random_blocks=3, attention="unidirectional")
    mask = config.layout(400, num_heads=2).mask
    assert not (mask & ~visible_blocks(400, 400, 16)).any()


def test_random_rows_have_their_count_and_are_seeded():
    layout = sa.Random(4, seed=11, block_size=16).layout(640)
    assert (layout.mask.sum(-1) == 4).all()
    causal = sa.Random(4, seed=11, block_size=16).layout(640, causal=True).mask[0]
    counts = causal.sum(-1)
    assert counts.tolist() == [min(4, r + 1) for r in range(40)]  # early rows take all they may
    again = sa.Random(4, seed=11, block_size=16).layout(640).mask
    other = sa.Random(4, seed=12, block_size=16).layout(640).mask
    assert torch.equal(layout.mask, again) and not torch.equal(layout.mask, other)
    per_head = sa.Random(4, seed=11, per_head=True, block_size=16).layout(640, num_heads=3).mask
    assert per_head.shape[0] == 3 and not torch.equal(per_head[0], per_head[1])


def test_random_blocks_are_spread_over_the_row():
    # The hash should not favour any key block: over many rows each column gets its share.
    mask = sa.Random(8, block_size=16).layout(16 * 512).mask[0]
    per_column = mask.sum(0).double()
    assert per_column.mean() == 8
    assert per_column.std() < 4  # binomial(512, 8/512) has std ~2.8


LAYOUT_SCRIPT = """
import hashlib, sparse_attention as sa
for p in [sa.Random(3, seed=5, per_head=True, block_size=16), sa.BigBird(seed=9, block_size=16),
          sa.VariableSparsityConfig(4, 16, True, num_random_blocks=2, seed=1),
          sa.BigBirdSparsityConfig(4, 16, True, num_random_blocks=2, seed=2)]:
    print(hashlib.sha256(p.layout(1000, num_heads=4).mask.numpy().tobytes()).hexdigest())
"""


def test_layouts_are_identical_in_another_process():
    import hashlib
    here = []
    for p in [sa.Random(3, seed=5, per_head=True, block_size=16), sa.BigBird(seed=9, block_size=16),
              sa.VariableSparsityConfig(4, 16, True, num_random_blocks=2, seed=1),
              sa.BigBirdSparsityConfig(4, 16, True, num_random_blocks=2, seed=2)]:
        here.append(hashlib.sha256(p.layout(1000, num_heads=4).mask.numpy().tobytes()).hexdigest())
    result = subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT], capture_output=True, text=True,
                            timeout=120, cwd=str(__import__("pathlib").Path(sa.__file__).parents[1]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == here


@pytest.mark.parametrize("name", sa.PATTERN_NAMES)
def test_decoding_and_chunks_see_what_the_full_sequence_sees(name):
    # A chunk of queries that starts on a block boundary gets the last rows of the full layout.
    pattern = sa.from_name(name, seq_len=1024, block_size=32, num_heads=2)
    for causal in (False, True):
        full = pattern.layout(1024, num_heads=2, causal=causal).mask
        for q_len in (32, 320):
            part = pattern.layout(q_len, 1024, num_heads=2, causal=causal).mask
            assert torch.equal(part, full[:, -part.shape[1]:]), (name, q_len, causal)
        # A single query in a partial last block: the last row of the full layout.
        full = pattern.layout(1000, num_heads=2, causal=causal).mask
        assert torch.equal(pattern.layout(1, 1000, num_heads=2, causal=causal).mask, full[:, -1:])


@pytest.mark.parametrize("name", sa.PATTERN_NAMES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_with_a_pattern_equals_the_reference(name, causal):
    g = torch.Generator().manual_seed(sa.PATTERN_NAMES.index(name))
    heads, kv_heads, q_len, k_len, d = 4, 2, 200, 200 if causal else 230, 32
    pattern = sa.from_name(name, seq_len=k_len, block_size=16, num_heads=heads)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    q, k, v = rand(1, heads, q_len, d), rand(1, kv_heads, k_len, d), rand(1, kv_heads, k_len, d)
    out = sa.sparse_attention(q, k, v, pattern, causal=causal)
    layout = pattern.layout(q_len, k_len, num_heads=heads, causal=causal)
    assert_matches_reference(out, q, k, v, layout, causal=causal)


def test_exact_local_window_is_applied_token_by_token():
    # Local(exact=True) is exactly |p - j| < window: compare with an element-level mask.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for n in (90, 150, 150))
    pattern = sa.Local(37, block_size=16, exact=True)
    for causal in (False, True):
        out = sa.sparse_attention(q, k, v, pattern, causal=causal)
        p, j = positions(90, 150)
        allowed = local_elements(p, j, 37) & ((j <= p) if causal else True)
        scores = (q @ k.transpose(-1, -2)) / 4
        want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
        torch.testing.assert_close(out, want)


def test_caller_window_and_pattern_window_intersect():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 100, 16, generator=g, dtype=torch.float64) for _ in range(3))
    pattern = sa.Local(30, block_size=16, exact=True)
    out = sa.sparse_attention(q, k, v, pattern, window=(None, 5))
    layout = pattern.layout(100)
    torch.testing.assert_close(out, reference.attention(q, k, v, layout, window=(29, 5)))


def test_growth_exponents_of_computed_blocks():
    """Computed blocks for N = 1k .. 64k (causal, block 64): ~N^1.5 for strided and fixed with
    stride_for, ~N for local, N^2 for dense (least-squares slope of log blocks on log N)."""
    lengths = [1024 * 2**i for i in range(7)]
    slopes = {}
    for name in ("strided", "fixed", "local", "dense"):
        blocks = [sa.from_name(name, seq_len=n).layout(n, causal=True).nnz for n in lengths]
        x = torch.tensor(lengths, dtype=torch.float64).log()
        y = torch.tensor(blocks, dtype=torch.float64).log()
        slopes[name] = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    print("growth exponents:", {k: round(v, 3) for k, v in slopes.items()})
    assert 1.4 < slopes["strided"] < 1.6
    assert 1.4 < slopes["fixed"] < 1.6
    assert 0.95 < slopes["local"] < 1.05
    assert 1.95 < slopes["dense"] < 2.05


def test_stride_for():
    assert sa.stride_for(4096, 64) == 512  # 64 blocks -> 8 blocks
    assert sa.stride_for(8192, 64) == 11 * 64  # sqrt(128) = 11.3
    assert sa.stride_for(100, 64) == 64  # at least one block
    for n in (1000, 12288, 65536):
        l = sa.stride_for(n, 32)
        assert l % 32 == 0 and abs(l / 32 - math.sqrt(math.ceil(n / 32))) <= 0.5


def test_union_and_intersection():
    a, b = sa.Local(40, block_size=16), sa.Fixed(64, num_patterns=2, block_size=16)
    for causal in (False, True):
        la, lb = a.layout(300, causal=causal, num_heads=2).mask, b.layout(300, causal=causal, num_heads=2).mask
        union, both = (a | b).layout(300, causal=causal, num_heads=2), (a & b).layout(300, causal=causal, num_heads=2)
        assert union.num_heads == 2 and torch.equal(union.mask, la | lb)
        assert torch.equal(both.mask, la & lb)
    three = a | b | sa.Dense(block_size=16)
    assert len(three.patterns) == 3
    narrow = sa.Local(50, block_size=16, exact=True) & sa.Local(30, block_size=16, exact=True)
    assert narrow.token_window == (29, 29)


def test_custom_from_mask_and_function_agree():
    rows = torch.arange(13).unsqueeze(1)
    cols = torch.arange(13).unsqueeze(0)
    mask = ((rows - cols).abs() <= 1) | (cols % 4 == 0)
    from_mask = sa.Custom(mask, block_size=16)
    vectorised = sa.Custom(lambda h, q, k: ((q - k).abs() <= 1) | (k % 4 == 0), block_size=16)
    looped = sa.Custom(lambda h, q, k: abs(q - k) <= 1 or k % 4 == 0, block_size=16)  # ints only
    for pattern in (from_mask, vectorised, looped):
        for causal in (False, True):
            got = pattern.layout(200, causal=causal).mask[0]
            assert torch.equal(got, mask & (cols <= rows) if causal else mask)
    # A larger square mask serves shorter sequences and decoding (bottom-right rows).
    assert torch.equal(from_mask.layout(100).mask[0], mask[:7, :7])
    assert torch.equal(from_mask.layout(1, 100).mask[0], mask[6:7, :7])
    per_head = sa.Custom(lambda h, q, k: (q - k) == h, per_head=True, block_size=16)
    heads = per_head.layout(48, num_heads=2).mask
    assert torch.equal(heads[0], rows[:3] - cols[:, :3] == 0)
    assert torch.equal(heads[1], rows[:3] - cols[:, :3] == 1)


def test_layouts_are_cached_per_instance_and_thread_safe():
    pattern = sa.Strided(64, block_size=16)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pattern.layout(999, causal=True)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is results[0] for r in results)
    assert pattern.layout(999, causal=True) is results[0]
    assert pattern.layout(999) is not results[0]
    for n in range(1, CACHE_SIZE + 10):
        pattern.layout(n)
    assert len(pattern._layouts) == CACHE_SIZE


def test_compiled_fullgraph_with_a_pattern():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 160, 16, generator=g) for _ in range(3))
    pattern = sa.Strided(48, block_size=16, factorized=True)
    config = sa.FixedSparsityConfig(4, 16, attention="unidirectional")

    def fn(q, k, v):
        return sa.sparse_attention(q, k, v, pattern, causal=True) + sa.sparse_attention(q, k, v, config)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    # Dynamic shapes: a new length or batch builds the pattern's layout for it.
    torch._dynamo.reset()
    dynamic = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)
    for batch, n in ((1, 160), (2, 100), (3, 77)):
        q, k, v = (torch.randn(batch, 4, n, 16, generator=g) for _ in range(3))
        torch.testing.assert_close(dynamic(q, k, v), fn(q, k, v))


def test_from_name_defaults_and_overrides():
    assert sa.from_name("strided", seq_len=4096).stride == sa.stride_for(4096, 64)
    assert sa.from_name("fixed", seq_len=4096, block_size=32).chunk == sa.stride_for(4096, 32)
    assert sa.from_name("local", seq_len=4096, window=100).window == 100
    assert sa.from_name("variable", seq_len=256, num_heads=3).num_heads == 3
    for name in sa.PATTERN_NAMES:
        pattern = sa.from_name(name, seq_len=2048, block_size=64, num_heads=2)
        assert isinstance(pattern, sa.Pattern) and pattern.block_size == 64
        assert 0 < pattern.layout(2048, num_heads=2).density <= 1


@pytest.mark.parametrize("make,argument", [
    (lambda: sa.Strided(100, block_size=64), "stride"),
    (lambda: sa.Strided(-64), "stride"),
    (lambda: sa.Fixed(128, summary=200, block_size=64), "summary"),
    (lambda: sa.Fixed(128, num_patterns=3, block_size=64), "num_patterns"),
    (lambda: sa.Fixed(128, num_patterns=2).layout(512, num_heads=3), "num_heads"),
    (lambda: sa.Strided(128, factorized=True).layout(512, num_heads=3), "num_heads"),
    (lambda: sa.Dilated(40, block_size=32), "dilation"),
    (lambda: sa.Local(0), "window"),
    (lambda: sa.Local(-5), "window"),
    (lambda: sa.Local(64, block_size=48), "block_size"),
    (lambda: sa.Global(num_blocks=5).layout(256), "num_blocks"),
    (lambda: sa.Global(tokens=[10, 300]).layout(256), "tokens"),
    (lambda: sa.Global(tokens=[-1]), "tokens"),
    (lambda: sa.Global(tokens=[1], num_blocks=1), "tokens, num_blocks"),
    (lambda: sa.Global(rows=False, columns=False), "rows, columns"),
    (lambda: sa.Random(-1), "num_blocks"),
    (lambda: sa.Random(2, seed=-3), "seed"),
    (lambda: sa.BigBird(num_window_blocks=0), "num_window_blocks"),
    (lambda: sa.Local(64, block_size=32) | sa.Local(64, block_size=64), "block_size"),
    (lambda: sa.Local(64, exact=True) | sa.Local(32, exact=True), "patterns"),
    (lambda: sa.Custom(torch.ones(3, 4, dtype=torch.bool), block_size=16).layout(100), "mask_or_fn"),
    (lambda: sa.Custom(torch.ones(2, 7, 7, dtype=torch.bool), block_size=16).layout(100, num_heads=3), "num_heads"),
    (lambda: sa.Custom(torch.ones(3, 3), block_size=16), "mask_or_fn"),
    (lambda: sa.Custom(42), "mask_or_fn"),
    (lambda: sa.Dense().layout(0), "q_len"),
    (lambda: sa.Dense().layout(10, 0), "k_len"),
    (lambda: sa.Dense().layout(10, num_heads=0), "num_heads"),
    (lambda: sa.from_name("nonsense", seq_len=10), "name"),
    (lambda: sa.from_name("strided", seq_len=0), "seq_len"),
    (lambda: sa.from_name("strided", seq_len=1024, window=3), "params"),
    (lambda: sa.from_name("variable", seq_len=1024, stride=3), "params"),
    (lambda: sa.stride_for(1024, 24), "block_size"),
])
def test_errors_name_the_argument(make, argument):
    with pytest.raises((ValueError, TypeError), match=f"^{argument}"):
        make()


def test_sparse_attention_rejects_what_is_not_a_layout():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(TypeError, match="^layout"):
        sa.sparse_attention(q, q, q, object())
    with pytest.raises(ValueError, match="^num_heads"):
        sa.sparse_attention(q, q, q, sa.Fixed(64, num_patterns=4, block_size=16, summary=16))
