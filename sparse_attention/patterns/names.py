"""from_name: every pattern by name, with defaults that follow the sequence length.

The command line (`sparse-attention show NAME`), the benchmarks and the training command build
their patterns here. Defaults, for seq_len N and block size bs (any of them can be overridden
by a keyword argument of the pattern's class):

| name | pattern | defaults |
| --- | --- | --- |
| dense | Dense | |
| local | Local | window = 4 * bs tokens each side (4 blocks; constant in N, so O(N)) |
| strided | Strided | stride = stride_for(N, bs) (~sqrt(N / bs) blocks, O(N^1.5)) |
| fixed | Fixed | chunk = stride_for(N, bs), summary = bs (the last block of each chunk) |
| dilated | Dilated | dilation = 2 * bs, window = 8 * dilation (every other block, 8 each side) |
| global | Global | num_blocks = 1 (the first block as global rows and columns) |
| random | Random | num_blocks = 3 per row, seed = 0 |
| bigbird | BigBird | 3 window blocks, 2 global blocks, 3 random blocks (the paper's ITC setting) |
| longformer | Longformer | window = 4 * bs tokens each side, global_tokens = [0] |
| variable | VariableSparsityConfig | DeepSpeed's defaults (windows of 4 blocks, block 0 global), num_heads heads |
"""

from __future__ import annotations

from sparse_attention.patterns.arguments import check_block_size, check_int
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.combinations import BigBird, Longformer
from sparse_attention.patterns.deepspeed import VariableSparsityConfig
from sparse_attention.patterns.global_random import Global, Random
from sparse_attention.patterns.local import Dense, Dilated, Local
from sparse_attention.patterns.sparse_transformer import Fixed, Strided, stride_for


# name -> (class, default keyword arguments for (seq_len, block_size)); see the table above.
_DEFAULTS = {
    "dense": (Dense, lambda n, bs: {}),
    "local": (Local, lambda n, bs: {"window": 4 * bs}),
    "strided": (Strided, lambda n, bs: {"stride": stride_for(n, bs)}),
    "fixed": (Fixed, lambda n, bs: {"chunk": stride_for(n, bs)}),
    "dilated": (Dilated, lambda n, bs: {"dilation": 2 * bs, "window": 16 * bs}),
    "global": (Global, lambda n, bs: {"num_blocks": 1}),
    "random": (Random, lambda n, bs: {"num_blocks": 3}),
    "bigbird": (BigBird, lambda n, bs: {"num_window_blocks": 3, "num_global_blocks": 2,
                                        "num_random_blocks": 3}),
    "longformer": (Longformer, lambda n, bs: {"window": 4 * bs, "global_tokens": (0,)}),
}

PATTERN_NAMES = tuple(_DEFAULTS) + ("variable",)


def from_name(name: str, *, seq_len: int, block_size: int = 64, num_heads: int = 1,
              **params) -> Pattern:
    """The pattern called `name` (one of PATTERN_NAMES) for sequences of about seq_len tokens.

    Defaults follow seq_len (see the table in this module's docstring); `params` override them
    with the keyword arguments of the pattern's class. num_heads matters only to patterns made
    for a head count (variable); the others serve any head count."""
    if name not in PATTERN_NAMES:
        raise ValueError(f"name: expected one of {', '.join(PATTERN_NAMES)}, got {name!r}")
    check_int("seq_len", seq_len, minimum=1)
    check_block_size(block_size)
    check_int("num_heads", num_heads, minimum=1)
    if name == "variable":
        cls = VariableSparsityConfig
        args, kwargs = (num_heads, block_size), params
    else:
        cls, defaults = _DEFAULTS[name]
        args, kwargs = (), {**defaults(seq_len, block_size), **params, "block_size": block_size}
    try:
        return cls(*args, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise TypeError(f"params: {name} ({cls.__name__}) does not take {error}") from None
        raise
