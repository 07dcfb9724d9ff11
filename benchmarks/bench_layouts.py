"""Per-input layouts: the cost of building block lists per call, select_blocks + block-sparse
attention against dense causal SDPA, and FlexAttention with create_block_mask per call.

    python benchmarks/bench_layouts.py --quick
    python benchmarks/bench_layouts.py --out bench-layouts [--device cuda]
    python benchmarks/bench_layouts.py --help

The code lives in sparse_attention/benchmark/layouts.py."""

import sys

from sparse_attention.benchmark.layouts import main

if __name__ == "__main__":
    sys.exit(main())
