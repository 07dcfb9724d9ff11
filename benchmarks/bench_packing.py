"""Packed documents (cu_seqlens) with the fixed pattern per document: ours against SDPA with
the block-diagonal causal mask and compiled FlexAttention with a document mask_mod.

    python benchmarks/bench_packing.py --out benchmarks/results/cpu-packing
    python benchmarks/bench_packing.py --help

The code lives in sparse_attention/benchmark/packing.py."""

import sys

from sparse_attention.benchmark.packing import main

if __name__ == "__main__":
    sys.exit(main())
