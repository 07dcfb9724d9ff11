"""`sparse-attention show NAME`: a pattern's block layout as a picture, with its cost.

Builds the pattern through `sparse_attention.from_name` (length-aware defaults), prints its
density, the blocks the kernels compute and the forward FLOPs next to dense attention, and
writes the picture to --out (any image suffix matplotlib knows) or prints it as text.

  sparse-attention show fixed --seq-len 4096 --block 64 --out fixed.png
  sparse-attention show bigbird --seq-len 8192 --causal
  sparse-attention show strided --param stride=1024
"""

from __future__ import annotations

import argparse
import ast

import sparse_attention as sa
from sparse_attention.show import resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sa.PATTERN_NAMES, help="the pattern")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens (default 4096)")
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (default 1)")
    parser.add_argument("--head-dim", type=int, default=64, help="for the FLOP count (default 64)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword argument of the pattern (Python literal), repeatable")
    parser.add_argument("--out", help="write the picture to this file (needs matplotlib)")
    parser.add_argument("--text", action="store_true", help="print the picture as text too")
    parser.add_argument("--ascii", action="store_true", help="text in plain ASCII")


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value  # a bare word, e.g. attention=unidirectional
    return params


def cost(layout: sa.BlockLayout, seq_len: int, heads: int, head_dim: int, causal: bool) -> dict:
    """Blocks the kernels compute (blocks hidden by the causal rule dropped) and forward FLOPs,
    for this layout and for dense attention."""
    window = (-1, 0 if causal else -1)
    lists = layout.block_lists(seq_len, seq_len, window, "cpu")
    per_head = heads // layout.num_heads
    computed = int(lists.row_offsets[-1]) * per_head
    n = layout.mask.shape[-1]
    dense = (n * (n + 1) // 2 if causal else n * n) * heads
    flops_per_block = 4 * layout.block_size**2 * head_dim
    return {"computed_blocks": computed, "dense_blocks": dense,
            "flops": computed * flops_per_block, "dense_flops": dense * flops_per_block}


def run(args: argparse.Namespace) -> dict:
    pattern = sa.from_name(args.name, seq_len=args.seq_len, block_size=args.block,
                           num_heads=args.heads, **parse_params(args.param))
    causal = args.causal or pattern.causal
    layout = resolve(pattern, args.seq_len, args.heads, causal)
    numbers = cost(layout, args.seq_len, args.heads, args.head_dim, causal)
    print(f"{pattern!r}")
    print(f"N={args.seq_len}, block {args.block}, {args.heads} head(s), head_dim {args.head_dim}"
          f"{', causal' if causal else ''}")
    print(f"density: {layout.density:.2%} of the {layout.mask.shape[-2]} x {layout.mask.shape[-1]} blocks")
    print(f"computed blocks: {numbers['computed_blocks']:,} (dense: {numbers['dense_blocks']:,}, "
          f"{numbers['computed_blocks'] / numbers['dense_blocks']:.1%})")
    print(f"forward FLOPs: {numbers['flops'] / 1e9:.3f} GFLOP (dense: "
          f"{numbers['dense_flops'] / 1e9:.3f} GFLOP, {numbers['dense_flops'] / numbers['flops']:.1f}x more)")
    if args.out:
        sa.show(pattern, args.seq_len, args.heads, args.out, causal=causal)
        print(f"wrote {args.out}")
    if args.text or not args.out:
        print(sa.show_text(pattern, args.seq_len, args.heads, causal=causal, ascii=args.ascii))
    return numbers
