"""`sparse-attention speed`: block-sparse against dense attention on one long sequence.

Runs forward + backward of causal attention with the Sparse Transformer's "fixed" pattern
(chunks of about sqrt(N / block) blocks, each query seeing its own chunk and the last block of
every earlier chunk: see `sparse-attention show fixed`) and with torch's
scaled_dot_product_attention, dense causal and with the equivalent boolean mask, then prints
the time and peak memory of each.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention import measure
from sparse_attention.benchmark import machine
from sparse_attention.benchmark.timing import median_time
from sparse_attention.element_rules import element_mask


def demo_layout(seq_len: int, block_size: int, chunk: int | None = None) -> sa.BlockLayout:
    """The causal layout of the Fixed pattern with chunk length `chunk` tokens (default
    stride_for(seq_len): about N*sqrt(N) computed elements)."""
    chunk = sa.stride_for(seq_len, block_size) if chunk is None else chunk
    return sa.Fixed(chunk, block_size=block_size).layout(seq_len, causal=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens (default 8192)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunk length of the fixed pattern in tokens, a multiple of the block "
                             "(default: stride_for(seq-len, block))")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median is shown)")
    parser.add_argument("--skip-masked", action="store_true",
                        help="skip SDPA with an explicit mask (it needs O(N^2) memory)")


def run(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    shape = (args.batch_size, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    layout = demo_layout(args.seq_len, args.block, args.chunk)
    print(machine.one_line(machine.describe()))
    print(f"q, k, v {list(shape)} {args.dtype}; causal; layout {layout}")

    candidates = {
        "sparse_attention (ours)": lambda: sa.sparse_attention(q, k, v, layout, causal=True),
        "SDPA dense causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if not args.skip_masked:
        # The boolean [N, N] mask equivalent to the layout (built once, outside the timing).
        mask = element_mask(layout, args.seq_len, args.seq_len, causal=True)[0]
        candidates["SDPA + layout mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    results = {}
    for name, forward in candidates.items():
        def step():
            forward().sum().backward()
            for t in (q, k, v):
                t.grad = None

        seconds = median_time(step, repeats=args.repeats)
        peak = measure.peak_memory(step)
        results[name] = (seconds, peak)
        print(f"  {name:26s} forward+backward {seconds * 1e3:9.1f} ms   peak memory "
              f"{measure.format_bytes(peak):>10s}")
    ours, dense = results["sparse_attention (ours)"], results["SDPA dense causal"]
    print(f"computed blocks: {layout.nnz} of {layout.mask.numel()} "
          f"({layout.density:.1%}); speed-up over dense causal SDPA: {dense[0] / ours[0]:.2f}x")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparse-attention speed", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
